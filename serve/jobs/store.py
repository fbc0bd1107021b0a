"""The job store: job records in S3, shared by every ingress replica, moved only by compare-and-swap.

POST /v1/videos `create`s a record; the replica that wins `try_acquire_lease` runs the stage chain, renews the lease
while it runs and `finish`es the job; a replica whose reclaim scan (`list_active_ids`) finds an expired lease takes
the job over. GET reads `get` + `merge_progress`, GET /v1/videos reads `list`. Every record write is conditional
(IfMatch on the ETag read), so two replicas can never both move one job.

S3 layout under the configured prefix:
    jobs/<id>.json                                      the record (JobRecord JSON)
    index/<tenant>/<inverted ms>_<id>                   empty marker; key order = newest first, per tenant
    index-asc/<tenant>/<ms>_<inverted random>_<id>      empty marker; key order = oldest first, per tenant
    active/<id>                                         empty marker while the job is not terminal (reclaim scans)
    progress/<id>.json                                  denoising step, written unconditionally by the denoiser replica

Two indexes because S3 lists keys in ascending order only: each order of GET /v1/videos is one forward listing
from the `after` cursor, never a scan of the tenant's whole index. Within one millisecond `index/` lists ids
ascending, so `index-asc/` inverts the id's random part: `asc` is then the exact reverse of `desc`, and an `after`
cursor in either order means "strictly past this id in that order" (a page boundary inside one millisecond loses
nothing). Both are derived from the id alone (`job_created_ms`), so a cursor whose job was deleted still works.

Crash safety (every step can be the last one a replica makes):
- `create` writes active, `index/`, `index-asc/`, then the record: any prefix of those writes leaves markers without
  a record, which both listings skip (they read each record) and the reclaim scan ages out; a record, once written,
  has both index markers.
- `delete` marks the record deleted first, then removes the markers together, then the record: whatever survives a
  crash points at a record `get` hides, and a retried DELETE finishes the job (marking an already deleted record is
  no change, so the removals run again).
- Records written before `index-asc/` existed have only the `index/` marker: `backfill_ascending_index` gives them
  theirs (idempotent; the ingress runs it at start). Until it has run, `order=asc` omits those older jobs; `desc` is
  unaffected.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import BaseModel, Field

from serve.config import JobsConfig
from serve.jobs.record import (
    JOB_ID_PREFIX,
    TERMINAL_STATUSES,
    JobError,
    JobRecord,
    JobResult,
    JobStatus,
    WebhookDelivery,
    is_job_id,
    job_created_ms,
    stage_index,
    stage_progress,
)
from serve.storage import NotFound, PreconditionFailed, Storage, StorageError

logger = logging.getLogger(__name__)

_INVERT_MS = 10**13 - 1  # 13 digits cover ms timestamps until the year 2286
_INVERT_RANDOM = 16**16 - 1  # the id's 16 hex random digits
_ID_LEN = len(JOB_ID_PREFIX) + 28
_LIST_FETCH_WORKERS = 8
_LIST_PAGE = 1000  # what one ListObjectsV2 call returns at most
_INDEX_DESC = "index"
_KNOWN_MAX = 4096  # records whose last version a store remembers (the jobs a replica drives, and more)
_STALE = object()  # `update`: the remembered version refused the change; decide again on the stored one
_MARKER_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="job-markers")  # `create`'s marker writes
_INDEX_ASC = "index-asc"

ListOrder = Literal["asc", "desc"]


def _marker_id(key: str) -> str | None:
    """The job id an index marker (either layout) ends with; None for a key that is no marker."""
    job_id = key[-_ID_LEN:]
    return job_id if is_job_id(job_id) else None


class JobNotFound(NotFound):
    """No record with that id (or it was deleted)."""


class JobExists(PreconditionFailed):
    """`create` found a different record under the same id."""


class UpdateConflict(StorageError):
    """Too many concurrent writers on one record; the caller may retry later."""

    status_code = 409


class _Skip(Exception):
    """Raised inside a mutate function to abort the update without an error (a lease we may not take)."""


class JobProgress(BaseModel):
    stage: str
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    attempt: int | None = Field(default=None, description="Chain attempt that wrote it; stale attempts ignored.")
    updated_at: float


class JobStore:
    def __init__(
        self,
        storage: Storage,
        *,
        retention_s: int | None = None,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        index_page: int = _LIST_PAGE,
    ) -> None:
        self.storage = storage
        self.retention_s = retention_s
        self._now = now
        self._sleep = sleep
        self._index_page = index_page  # markers per LIST call of the backfill (small in tests: page boundaries)
        # the last version of each record this store wrote or read, with its ETag: a compare-and-swap starts from
        # it instead of a GET (the conditional PUT still checks it; a stale one costs one 412 and a re-read)
        self._known: OrderedDict[str, tuple[JobRecord, str]] = OrderedDict()
        self._known_lock = threading.Lock()

    def _remember(self, rec: JobRecord, etag: str) -> None:
        with self._known_lock:
            self._known[rec.id] = (rec.model_copy(deep=True), etag)
            self._known.move_to_end(rec.id)
            while len(self._known) > _KNOWN_MAX:
                self._known.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        with self._known_lock:
            self._known.pop(job_id, None)

    def _recalled(self, job_id: str) -> tuple[JobRecord, str] | None:
        with self._known_lock:
            got = self._known.get(job_id)
        return None if got is None else (got[0].model_copy(deep=True), got[1])

    @classmethod
    def from_config(cls, storage: Storage, jobs: JobsConfig, now: Callable[[], float] = time.time) -> JobStore:
        return cls(storage, retention_s=jobs.retention_s, now=now)

    def configure(self, jobs: JobsConfig) -> None:
        """New settings (the retention of jobs that end from now on)."""
        self.retention_s = jobs.retention_s

    # ---- keys ---------------------------------------------------------------------------------------------------

    def record_key(self, job_id: str) -> str:
        return self.storage.key("jobs", f"{job_id}.json")

    def index_key(self, tenant: str, job_id: str) -> str:
        """The newest-first marker (same-millisecond ids ascending)."""
        inverted = _INVERT_MS - job_created_ms(job_id)
        return self.storage.key(_INDEX_DESC, tenant, f"{inverted:013d}_{job_id}")

    def asc_index_key(self, tenant: str, job_id: str) -> str:
        """The oldest-first marker: the exact reverse of `index_key`'s order, same-millisecond ids descending."""
        inverted = _INVERT_RANDOM - int(job_id[-16:], 16)
        return self.storage.key(_INDEX_ASC, tenant, f"{job_created_ms(job_id):013d}_{inverted:016x}_{job_id}")

    def index_keys(self, tenant: str, job_id: str) -> list[str]:
        """Every index marker of a job: what `create` writes and `delete` removes."""
        return [self.index_key(tenant, job_id), self.asc_index_key(tenant, job_id)]

    def active_key(self, job_id: str) -> str:
        return self.storage.key("active", job_id)

    def progress_key(self, job_id: str) -> str:
        return self.storage.key("progress", f"{job_id}.json")

    # ---- create / read ------------------------------------------------------------------------------------------

    def create(self, record: JobRecord) -> JobRecord:
        """Store a new record (version 1). Raises JobExists if another record already has this id."""
        rec = record.model_copy(update={"version": 1, "updated_at": self._now()})
        # Markers first: a marker without a record is harmless (listing and reclaim skip it), while a record
        # without its active marker would never be reclaimed if this replica died right after writing it, and one
        # without an index marker would be missing from that order's listing.
        markers = [*([self.active_key(rec.id)] if not rec.is_terminal else []), *self.index_keys(rec.tenant, rec.id)]
        # in parallel: a POST waits for one marker write, not three in a row
        list(_MARKER_POOL.map(lambda key: self.storage.put_bytes(key, b"", "application/octet-stream"), markers))
        try:
            etag = self.storage.put_if_absent(self.record_key(rec.id), rec.to_json_bytes())
            self._remember(rec, etag)
        except PreconditionFailed:
            # A botocore retry of our own PUT whose first response was lost also ends here: that is success.
            existing = self.get(rec.id, include_deleted=True)
            if existing is not None and existing == rec:
                return existing
            raise JobExists(f"job {rec.id} already exists") from None
        return rec

    def get(self, job_id: str, *, include_deleted: bool = False) -> JobRecord | None:
        got = self._read(job_id)
        if got is None:
            return None
        rec = got[0]
        return None if rec.deleted and not include_deleted else rec

    def _read(self, job_id: str) -> tuple[JobRecord, str] | None:
        if not is_job_id(job_id):
            # Ids come from URLs: never let one shape an S3 key.
            return None
        got = self.storage.get_with_etag(self.record_key(job_id))
        if got is None:
            return None
        data, etag = got
        rec = JobRecord.from_json_bytes(data)
        self._remember(rec, etag)
        return rec, etag

    # ---- compare-and-swap ---------------------------------------------------------------------------------------

    def update(
        self, job_id: str, mutate: Callable[[JobRecord], JobRecord | None], max_retries: int = 10
    ) -> JobRecord:
        """Read, `mutate`, write back only if nobody wrote in between; on a lost race, re-read and re-apply.

        `mutate` gets a private copy (it may change it in place and return it) and must be safe to call again.
        Returning None means "no change": nothing is written and the current record is returned. An exception from
        `mutate` aborts the update and propagates. Raises JobNotFound, or UpdateConflict after `max_retries` losses.
        """
        written: JobRecord | None = None
        for attempt in range(max_retries):
            # the first try starts from the version this store saw last, unread: the conditional PUT verifies it
            recalled = self._recalled(job_id) if attempt == 0 else None
            got = recalled or self._read(job_id)
            if got is None:
                raise JobNotFound(f"job {job_id} not found")
            current, etag = got
            if written is not None and current == written:
                # Our write landed but its answer was lost and botocore's retry got 412: applying `mutate`
                # again would apply it twice (e.g. attempts += 2).
                return current
            try:
                new = mutate(current.model_copy(deep=True))
            except Exception:
                if recalled is None:
                    raise
                new = _STALE  # a refusal is decided on the record as it is in S3, never on a remembered one
            if new is None and recalled is None:
                return current
            if new is None or new is _STALE:
                self._forget(job_id)
                continue
            if new.id != current.id:
                raise ValueError(f"mutate changed the job id from {current.id} to {new.id}")
            new = new.model_copy(update={"version": current.version + 1, "updated_at": self._now()})
            written = new
            try:
                self._remember(new, self.storage.put_if_match(self.record_key(job_id), new.to_json_bytes(), etag))
                return new
            except (PreconditionFailed, NotFound):
                # Someone else wrote (or deleted) first: re-read. Jitter so two losers do not collide again.
                self._forget(job_id)
                if recalled is None:
                    self._sleep(random.uniform(0, min(0.005 * 2**attempt, 0.2)))
        raise UpdateConflict(f"job {job_id}: gave up after {max_retries} conflicting writes")

    def _update_or_none(self, job_id: str, mutate: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        try:
            return self.update(job_id, mutate)
        except (_Skip, JobNotFound):
            return None

    # ---- leases -------------------------------------------------------------------------------------------------

    def try_acquire_lease(
        self, job_id: str, owner: str, lease_s: float, now: float | None = None,
        then: Callable[[JobRecord], JobRecord | None] | None = None,
    ) -> JobRecord | None:
        """Take the job if it is live and its lease is free, expired or already ours; None otherwise. `then` may
        change the taken record further in the same write (the runner starts the first attempt with it); its
        None leaves the record as taken."""

        def take(rec: JobRecord) -> JobRecord:
            t = self._now() if now is None else now
            if rec.is_terminal or rec.deleted:
                raise _Skip
            if rec.lease_owner != owner and not rec.lease_is_free(t):
                raise _Skip
            rec.lease_owner = owner
            rec.lease_expires_at = t + lease_s
            if then is not None:
                rec = then(rec) or rec
            return rec

        return self._update_or_none(job_id, take)

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> JobRecord | None:
        """Extend our lease; None if the job is gone, over, or another replica took it (stop working on it).

        The returned record carries `cancel_requested`, so the heartbeat doubles as the cancel check.
        """

        def renew(rec: JobRecord) -> JobRecord:
            # Still ours even if it expired, as long as nobody took it over in the meantime.
            if rec.lease_owner != owner or rec.is_terminal or rec.deleted:
                raise _Skip
            rec.lease_expires_at = self._now() + lease_s
            return rec

        return self._update_or_none(job_id, renew)

    def release_lease(self, job_id: str, owner: str) -> JobRecord | None:
        """Give the job back (e.g. on graceful shutdown) so another replica can take it at once."""

        def release(rec: JobRecord) -> JobRecord:
            if rec.lease_owner != owner:
                raise _Skip
            rec.lease_owner = None
            rec.lease_expires_at = None
            return rec

        return self._update_or_none(job_id, release)

    def finish(
        self,
        job_id: str,
        owner: str | None,
        status: JobStatus,
        *,
        error: JobError | None = None,
        result: JobResult | None = None,
        timings: dict[str, float] | None = None,
        gpus: dict[str, float] | None = None,
        bill: bool = False,
        notify: Callable[[JobRecord], bool] | None = None,
        notify_claim_s: float = 0.0,
    ) -> JobRecord | None:
        """Terminal transition by the lease holder; None if we lost the lease or the job already ended.

        `owner=None` finishes a job nobody holds (e.g. cancelling a queued job): only while the lease is free.
        `bill`: a completed job owes a usage record; the same write says so (`billing: pending`) and the active marker
        stays until `billing_recorded`, so the obligation survives any failure after this write. `notify(record)`:
        whether the job has a webhook to deliver; then the same write makes it pending, claimed by this writer for
        `notify_claim_s`, and the marker stays until `webhook_finished`.
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish needs a terminal status {sorted(TERMINAL_STATUSES)}, got {status!r}")

        # how far the chain got (the side channel is removed below): a cancelled or failed job shows its step
        last = self.get_progress(job_id) if status != "completed" else None

        def end(rec: JobRecord) -> JobRecord:
            t = self._now()
            if rec.is_terminal or rec.deleted:
                raise _Skip
            if owner is None and not rec.lease_is_free(t):
                raise _Skip
            if owner is not None and rec.lease_owner != owner:
                raise _Skip
            rec.status = status
            rec.completed_at = int(t)
            if self.retention_s is not None:
                rec.expires_at = int(t) + self.retention_s
            if status == "completed":
                rec.progress = 100
                rec.step = rec.total_steps
            elif last is not None and (last.attempt is None or last.attempt == rec.attempts):
                rec.stage, rec.step = last.stage, last.step
            rec.error = error
            rec.result = result
            if timings:
                rec.timings.update(timings)
            if gpus:
                rec.gpus.update(gpus)
            rec.lease_owner = None
            rec.lease_expires_at = None
            rec.billing = "pending" if status == "completed" and bill else None
            rec.webhook = (WebhookDelivery(claimed_until=t + notify_claim_s)
                           if notify is not None and notify(rec) else None)
            return rec

        rec = self._update_or_none(job_id, end)
        if rec is not None:
            # with an obligation pending the marker (the outbox entry) stays, and the progress object goes with it
            # when the obligation ends (`_settled`): one delete for both
            markers = [] if rec.obligations_pending else [self.active_key(job_id), self.progress_key(job_id)]
            try:
                if markers:
                    self.storage.delete_many(markers)
            except StorageError as exc:
                # The record is already terminal; a leftover marker is dropped by the next reclaim scan.
                logger.warning("job %s finished but its markers remain: %s", job_id, exc)
        return rec

    def billing_recorded(self, job_id: str) -> JobRecord | None:
        """The job's usage record is in S3: `billing` pending -> recorded, and its active marker (the outbox entry)
        goes. None if nothing was pending (already recorded by another replica, or never owed)."""
        def done(rec: JobRecord) -> JobRecord:
            if rec.billing != "pending":
                raise _Skip
            rec.billing = "recorded"
            return rec

        return self._settled(self._update_or_none(job_id, done))

    def _settled(self, rec: JobRecord | None) -> JobRecord | None:
        """After an obligation ended: the outbox entry (active marker) goes once none is left."""
        if rec is not None and not rec.obligations_pending:
            self.storage.delete_many([self.active_key(rec.id), self.progress_key(rec.id)])
        return rec

    def claim_webhook(self, job_id: str, until: float) -> JobRecord | None:
        """Take over a pending webhook whose claim has lapsed (its deliverer died or gave up mid-way): claimed by
        the caller until `until`. None if it is not pending, or someone's claim still holds."""
        def claim(rec: JobRecord) -> JobRecord:
            hook = rec.webhook
            if hook is None or hook.state != "pending" or (hook.claimed_until or 0) > self._now():
                raise _Skip
            rec.webhook = hook.model_copy(update={"claimed_until": until})
            return rec

        return self._update_or_none(job_id, claim)

    def webhook_finished(self, job_id: str, state: str, *, attempts: int, status_code: int | None = None,
                         error: str | None = None) -> JobRecord | None:
        """The delivery ended (delivered, failed after its retries, or refused by the address check)."""
        def end(rec: JobRecord) -> JobRecord:
            if rec.webhook is None or rec.webhook.state != "pending":
                raise _Skip
            rec.webhook = WebhookDelivery(state=state, attempts=attempts, status_code=status_code, error=error,
                                          finished_at=self._now())
            return rec

        return self._settled(self._update_or_none(job_id, end))

    # ---- listing ------------------------------------------------------------------------------------------------

    def list(
        self, limit: int = 20, after: str | None = None, *, tenant: str, order: ListOrder = "desc"
    ) -> tuple[list[JobRecord], bool]:
        """A page of the tenant's jobs, newest (`desc`) or oldest (`asc`) first, strictly past job id `after` in
        that order; returns (records, has_more)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if order == "desc":
            layout, marker = _INDEX_DESC, self.index_key
        elif order == "asc":
            layout, marker = _INDEX_ASC, self.asc_index_key
        else:
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        prefix = self.storage.key(layout, tenant, "")
        start_after = marker(tenant, after) if after else None
        found: list[JobRecord] = []
        # One record more than asked tells whether another page exists. Markers of deleted or half-created jobs
        # are skipped, so keep reading until we have enough or the index ends.
        while len(found) <= limit:
            want = limit + 1 - len(found)
            keys = self.storage.list_keys(prefix, start_after=start_after, max_keys=want)
            if not keys:
                break
            start_after = keys[-1]
            ids = [i for i in map(_marker_id, keys) if i is not None]
            for rec in self._get_many(ids):
                if rec is not None and rec.tenant == tenant:
                    found.append(rec)
            if len(keys) < want:
                break
        return found[:limit], len(found) > limit

    def _get_many(self, ids: list[str]) -> list[JobRecord | None]:
        if len(ids) <= 1:
            return [self.get(i) for i in ids]
        with ThreadPoolExecutor(max_workers=min(_LIST_FETCH_WORKERS, len(ids))) as pool:
            return list(pool.map(self.get, ids))

    def backfill_ascending_index(self, tenant: str | None = None) -> int:
        """Give every job in `index/` (one tenant's, or all) its `index-asc/` marker; returns how many were missing.

        For records created before the oldest-first index existed. Idempotent and cheap to repeat (about two LIST
        calls per 1000 jobs once nothing is missing), so the ingress runs it at every start: a job created by a
        replica of the old version during a rolling upgrade gets its marker at the next start (or call this again).
        The `index/` marker is read page by page and compared with the `index-asc/` markers of the same
        milliseconds, so memory stays at one page whatever the tenant's size.
        """
        root = self.storage.key(_INDEX_DESC, "")
        prefix = self.storage.key(_INDEX_DESC, tenant, "") if tenant is not None else root
        written = 0
        start_after: str | None = None
        with ThreadPoolExecutor(max_workers=_LIST_FETCH_WORKERS) as pool:
            while True:
                keys = self.storage.list_keys(prefix, start_after=start_after, max_keys=self._index_page)
                if not keys:
                    return written
                start_after = keys[-1]
                # a page of all tenants' markers can span several tenants
                by_tenant: dict[str, list[str]] = {}
                for key in keys:
                    job_id = _marker_id(key)
                    if job_id is not None:
                        by_tenant.setdefault(key[len(root) :].split("/", 1)[0], []).append(job_id)
                for t, ids in by_tenant.items():
                    ms = [job_created_ms(i) for i in ids]
                    have = self._asc_ids_between(t, min(ms), max(ms))
                    missing = [i for i in ids if i not in have]
                    written += sum(pool.map(lambda i, t=t: self._backfill_one(t, i), missing))
                if len(keys) < self._index_page:
                    return written

    def _asc_ids_between(self, tenant: str, lo_ms: int, hi_ms: int) -> set[str]:
        """Ids with an `index-asc/` marker created in milliseconds lo_ms..hi_ms."""
        prefix = self.storage.key(_INDEX_ASC, tenant, "")
        start_after = prefix + f"{lo_ms:013d}"  # sorts before every marker of lo_ms (a prefix of them)
        found: set[str] = set()
        while True:
            keys = self.storage.list_keys(prefix, start_after=start_after, max_keys=self._index_page)
            for key in keys:
                if int(key[len(prefix) : len(prefix) + 13]) > hi_ms:
                    return found
                job_id = _marker_id(key)
                if job_id is not None:
                    found.add(job_id)
            if len(keys) < self._index_page:
                return found
            start_after = keys[-1]

    def _backfill_one(self, tenant: str, job_id: str) -> bool:
        key = self.asc_index_key(tenant, job_id)
        self.storage.put_bytes(key, b"", "application/octet-stream")
        if self.storage.exists(self.index_key(tenant, job_id)):
            return True
        # deleted while we listed: its `delete` may have removed the markers before our PUT; do not leave ours
        self.storage.delete(key)
        return False

    def list_active_ids(self) -> list[str]:
        """Ids with an active marker: queued or running jobs (plus stale markers, see `drop_active`)."""
        prefix = self.storage.key("active", "")
        ids: list[str] = []
        start_after: str | None = None
        while True:
            keys = self.storage.list_keys(prefix, start_after=start_after)
            ids.extend(k[len(prefix) :] for k in keys)
            if len(keys) < 1000:
                return ids
            start_after = keys[-1]

    def drop_active(self, job_id: str) -> None:
        """Remove a stale active marker (record missing, terminal or deleted) found by a reclaim scan.

        A scan should leave markers of missing records alone for a while (`job_created_ms` says how old the id is):
        `create` writes the marker just before the record.
        """
        self.storage.delete(self.active_key(job_id))

    # ---- delete -------------------------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        """Every tenant with jobs in the (oldest-first) index."""
        prefix = self.storage.key(_INDEX_ASC, "")
        return [p[len(prefix):].rstrip("/") for p in self.storage.list_prefixes(prefix)]

    def delete(self, job_id: str) -> JobRecord | None:
        """Remove the job (record, markers, progress); returns the last record so the caller can delete videos.

        The record is first marked deleted so a crash half-way leaves a job that is hidden everywhere.
        """
        existing = self.get(job_id, include_deleted=True)
        if existing is None:
            return None

        def mark(rec: JobRecord) -> JobRecord | None:
            if rec.deleted:
                return None
            rec.deleted = True
            rec.cancel_requested = True
            return rec

        rec = self._update_or_none(job_id, mark)
        if rec is None:
            return None
        self.storage.delete_many(
            [*self.index_keys(rec.tenant, job_id), self.active_key(job_id), self.progress_key(job_id)]
        )
        self.storage.delete(self.record_key(job_id))
        self._forget(job_id)
        return rec

    # ---- progress side channel ----------------------------------------------------------------------------------

    def put_progress(
        self, job_id: str, stage: str, step: int, total: int, *, attempt: int | None = None
    ) -> bool:
        """Best effort, from the denoiser: a separate object, so it never races the lease CAS on the record.

        Returns False (and logs) on a storage error instead of raising: progress must not fail a job. Callers on
        the denoising hot path should still call it off-thread (botocore retries can block for seconds).
        """
        p = JobProgress(stage=stage, step=step, total_steps=total, attempt=attempt, updated_at=self._now())
        try:
            self.storage.put_bytes(self.progress_key(job_id), p.model_dump_json().encode(), "application/json")
        except StorageError as exc:
            logger.warning("progress of job %s not written: %s", job_id, exc)
            return False
        return True

    def get_progress(self, job_id: str) -> JobProgress | None:
        if not is_job_id(job_id):
            return None
        got = self.storage.get_with_etag(self.progress_key(job_id))
        return None if got is None else JobProgress.model_validate_json(got[0])

    def clear_progress(self, job_id: str) -> None:
        """Drop progress left by an earlier attempt (call when a new attempt starts)."""
        self.storage.delete(self.progress_key(job_id))

    def merge_progress(self, record: JobRecord) -> JobRecord:
        """The record as GET should show it: with the side channel's step if that is further along."""
        if record.status != "in_progress":
            return record
        p = self.get_progress(record.id)
        if p is None:
            return record
        if p.attempt is not None and record.attempts and p.attempt != record.attempts:
            return record  # written by an earlier (abandoned) attempt
        r_idx, p_idx = stage_index(record.stage), stage_index(p.stage)
        if p_idx == -1 or r_idx == -1:
            ahead = p.updated_at > record.updated_at
        else:
            ahead = p_idx > r_idx or (p_idx == r_idx and p.step >= record.step)
        if not ahead:
            return record
        percent = max(record.progress, stage_progress(p.stage, p.step, p.total_steps))
        return record.model_copy(
            update={"stage": p.stage, "step": p.step, "total_steps": p.total_steps, "progress": percent}
        )
