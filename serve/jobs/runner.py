"""Drives accepted jobs to an end on an ingress replica: lease, run the stage chain, retry, finish.

Every accepted job ends `completed`, `failed` (with a reason) or `cancelled`:
- the owner holds a lease on the job record and renews it every `heartbeat_s`;
- a chain attempt that raises is retried (the whole chain) up to `max_attempts`, counted in the record,
  so attempts made by a replica that died still count;
- every replica scans the `active/` markers every `reclaim_interval_s` and takes over jobs whose lease
  expired (their ingress died) or that nobody ever started;
- a cancel sets `cancel_requested` in the record (a DELETE removes the record); the owner sees it at its
  next heartbeat (or at once if the request landed on the same replica) and cancels the in-flight chain,
  which cancels the stage requests, so the Denoiser stops at its next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from serve.config import JobsConfig
from serve.jobs.queue import Backlog, FairQueue
from serve.jobs.record import (
    ChainResult,
    JobError,
    JobRecord,
    JobResult,
    job_created_ms,
)
from serve.jobs.store import JobStore
from serve.logcontext import bind_job
from serve.metrics import JobEvents
from serve.stages.stage import TEXT_ENCODER, StageError, StageUnavailable
from serve.storage import NotFound, PreconditionFailed, StorageError

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    """The stage chain for one job (Ray Serve handles in production, a fake in unit tests)."""

    async def run(self, job: JobRecord) -> ChainResult:
        """Run the chain once: the video's object keys and per-stage seconds."""
        ...


class NonRetryableError(Exception):
    """A failure that another attempt cannot fix (the request itself is bad for the model)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _LeaseLost(Exception):
    """Another replica took the job over (our renewals did not land in time): stop without touching it."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """A client-safe (code, message) for a failed attempt: no node addresses, actor ids or tracebacks."""
    if isinstance(exc, NonRetryableError):
        return exc.code, exc.message
    if isinstance(exc, asyncio.TimeoutError):
        return "stage_timeout", "a pipeline stage did not answer within the attempt timeout"
    if isinstance(exc, StageUnavailable):
        return "replica_died", f"the {exc.stage} replica running this job stopped before it finished"
    if isinstance(exc, StageError):
        return "stage_error", f"the {exc.stage} stage failed ({exc.message})"
    return "internal_error", f"generation failed ({type(exc).__name__})"


class JobRunner:
    def __init__(self, store: JobStore, pipeline: Pipeline, cfg: JobsConfig, owner: str,
                 clock: Callable[[], float] = time.time,
                 on_finished: Callable[[JobRecord], Awaitable[None]] | None = None,
                 events: JobEvents | None = None,
                 on_unbilled: Callable[[JobRecord], Awaitable[bool]] | None = None,
                 on_unnotified: Callable[[JobRecord], Awaitable[None]] | None = None) -> None:
        self._store = store
        self._pipeline = pipeline
        self._cfg = cfg
        self.owner = owner
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._attempts: dict[str, asyncio.Task[ChainResult]] = {}
        self._reclaimer: asyncio.Task[None] | None = None
        self._finishing: set[str] = set()  # terminal S3 writes in flight (threads)
        self._ending: set[str] = set()  # terminal write + end-of-job hook in progress
        # accepted jobs wait here, per model and per tenant, for a chain slot of their model: round-robin across
        # tenants, so one tenant's burst does not delay another's single job; a model's slots follow the capacity
        # of its stages (`set_capacity`), all models' together stay within `max_concurrent_per_replica`
        self._queues: dict[str, FairQueue] = {}
        self._model_of: dict[str, str] = {}  # queued or running job -> its model
        self._slot_held: set[str] = set()  # chains holding a slot of their model (in the stages)
        self._capacity: dict[str, int] = {}  # model -> chain slots on this replica; a model not in it: the ceiling
        self._on_finished = on_finished
        # a completed job whose bill is still pending (its usage record not in S3 yet: an S3 outage, or the replica
        # that finished it died first): the reclaim scan hands it to this, which records it (True when done)
        self._on_unbilled = on_unbilled
        self.bills_usage = on_unbilled is not None  # completed jobs owe a usage record (usage.enabled)
        # a terminal job whose webhook is still pending past its claim (its deliverer died): sent again from here
        self._on_unnotified = on_unnotified
        self.notify_for: Callable[[JobRecord], bool] | None = None  # whether a job's end is to be sent
        self.notify_claim_s = 0.0  # how long the finishing replica holds its delivery (WebhookSender.claim_s)
        # jobs sync requests wait for (their terminal record, once it lands here), and how many wait
        self._ended: dict[str, tuple[asyncio.Future[JobRecord], int]] = {}
        self.backlog: Backlog | None = None  # the cluster's queue as the last reclaim scan read it
        self._stopping = False
        self._events = events or JobEvents()  # metrics (deployments/metrics.py); the default records nothing

    def configure(self, cfg: JobsConfig) -> None:
        """New job settings (attempts, lease, timeouts, concurrency) for what the runner does next; the chains
        in flight go on. More chain slots are used at once."""
        self._cfg = cfg
        self._dispatch()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._reclaimer is None:
            self._reclaimer = asyncio.get_running_loop().create_task(self._reclaim_loop())

    async def stop(self) -> None:
        """Stop driving jobs and hand their leases back, so another replica takes them over at once."""
        self._stopping = True
        held = list(self._tasks)
        interrupted = set(self._attempts)  # chains cut short by the stop: not the job's fault
        tasks = [t for t in [self._reclaimer, *self._tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # a cancelled `_finish` leaves its S3 write running in a thread: let it land first
        deadline = time.monotonic() + 10
        while self._finishing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job_id in held:
            def hand_back(rec: JobRecord, refund: bool = job_id in interrupted) -> JobRecord | None:
                if rec.lease_owner != self.owner or rec.is_terminal:
                    return None
                # a rolling upgrade must not use up a job's attempts: the interrupted one is given back
                attempts = max(0, rec.attempts - 1) if refund else rec.attempts
                return rec.model_copy(update={"lease_owner": None, "lease_expires_at": None, "attempts": attempts})

            try:
                await asyncio.to_thread(self._store.update, job_id, hand_back)
                if job_id in interrupted:  # its number is given back: the next attempt must not show its progress
                    await asyncio.to_thread(self._store.clear_progress, job_id)
            except Exception:  # noqa: BLE001 - the lease then simply expires
                log.warning("job %s: could not release lease", job_id, exc_info=True)

    @property
    def running(self) -> set[str]:
        return set(self._tasks)

    def submit(self, job_id: str, tenant: str, model: str = "") -> None:
        """Queue `job_id` to be driven here (fairly among tenants) unless this replica already has it."""
        if job_id in self._tasks or job_id in self._model_of:
            return
        self._queues.setdefault(model, FairQueue()).push(tenant, job_id)
        self._model_of[job_id] = model
        self._dispatch()
        self._events.queue_changed(self.queued, len(self._tasks))

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def set_capacity(self, slots: dict[str, int]) -> None:
        """Chain slots per model on this replica (the Ingress derives them from the stage replicas that exist, see
        deployments/ingress.py); more slots start queued jobs at once, fewer let the chains in flight finish."""
        self._capacity = {m: max(1, int(n)) for m, n in slots.items()}
        self._dispatch()

    def slots(self, model: str) -> int:
        return min(self._capacity.get(model, self._cfg.max_concurrent_per_replica),
                   self._cfg.max_concurrent_per_replica)

    def _running_per_model(self) -> Counter[str]:
        return Counter(self._model_of[j] for j in self._slot_held)

    def demand(self) -> dict[str, tuple[int, int]]:
        """(queued, running) per model on this replica: what it reports for the stages' autoscaling."""
        running = self._running_per_model()
        return {m: (len(self._queues.get(m, ())), running[m]) for m in set(self._queues) | set(running)}

    def _next(self) -> str | None:
        """The next job to start: models in turn, each while it has a free slot."""
        running = self._running_per_model()
        for model in list(self._queues):
            if running[model] >= self.slots(model):
                continue
            queue = self._queues.pop(model)
            job_id = queue.pop()
            if queue:
                self._queues[model] = queue  # to the back: the next start goes to another model first
            if job_id is not None:
                self._slot_held.add(job_id)
                return job_id
        return None

    def _dispatch(self) -> None:
        while not self._stopping and len(self._tasks) < self._cfg.max_concurrent_per_replica:
            job_id = self._next()
            if job_id is None:
                return
            # an empty context, not a copy of whichever request dispatched it: the job outlives that request and
            # must not log as it, nor make its stage calls as its children (under Serve they would carry its
            # request id, and be cancelled with it when its client goes away)
            task = asyncio.get_running_loop().create_task(self._drive(job_id), name=f"job-{job_id}",
                                                          context=contextvars.Context())
            self._tasks[job_id] = task
            task.add_done_callback(lambda _t, j=job_id: self._done(j))

    def _done(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._free_slot(job_id)
        self._model_of.pop(job_id, None)
        self._dispatch()
        self._events.queue_changed(self.queued, len(self._tasks))

    def _free_slot(self, job_id: str) -> None:
        """The job's chain left the stages: its model's slot goes to the next queued job (the terminal write,
        bill and webhook that follow need no stage)."""
        self._slot_held.discard(job_id)

    async def finished(self, job: JobRecord) -> None:
        """A terminal transition landed (here or by the service): release, bill, notify — never raises."""
        self._events.job_finished(job, self._clock())
        waiting = self._ended.pop(job.id, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(job)
        if self._on_finished is None:
            return
        try:
            await self._on_finished(job)
        except Exception:  # noqa: BLE001
            log.exception("job %s: end-of-job hook failed", job.id)

    async def _settle(self, job: JobRecord, now: float) -> None:
        # the replica that finished it bills it right after its terminal write: give it a heartbeat's time first
        if job.id in self._ending or now - (job.completed_at or now) < self._cfg.heartbeat_s:
            return
        await self.settle(job)

    async def settle(self, job: JobRecord) -> bool:
        """Record a completed job's pending bill (any replica, any number of times: the usage record is written
        once); True when nothing is pending any more."""
        if job.billing != "pending" or self._on_unbilled is None:
            return job.billing != "pending"
        try:
            return await self._on_unbilled(job)
        except Exception:  # noqa: BLE001 - still pending: the next scan tries again
            log.warning("job %s: bill still pending", job.id, exc_info=True)
            return False

    async def ended(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Wait up to `timeout_s` for `job_id` to end on this replica (its terminal transition landing here); its
        terminal record if it did, else None. A job another replica ends is seen only by reading its record. Any
        number may wait on one job; the last to stop waiting forgets it."""
        ended, waiters = self._ended.get(job_id) or (asyncio.get_running_loop().create_future(), 0)
        self._ended[job_id] = (ended, waiters + 1)
        try:  # shielded: one waiter's timeout must not cancel what the others wait for
            return await asyncio.wait_for(asyncio.shield(ended), timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            held = self._ended.get(job_id)
            if held is not None and held[0] is ended:
                if held[1] <= 1:
                    del self._ended[job_id]
                else:
                    self._ended[job_id] = (ended, held[1] - 1)


    def cancel_local(self, job_id: str) -> bool:
        """Cancel the in-flight attempt of a job this replica drives; False if it is not running here."""
        model = self._model_of.get(job_id)
        queue = self._queues.get(model) if model is not None else None
        if queue is not None and queue.remove(job_id):
            self._model_of.pop(job_id, None)
            if not queue:
                del self._queues[model]
        self._events.queue_changed(self.queued, len(self._tasks))
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return False
        attempt.cancel()
        return True

    # -- one job ---------------------------------------------------------------------------------
    async def _drive(self, job_id: str) -> None:
        started: list[bool] = [False]  # whether the lease's write also started the attempt (set per try of it)

        def start(rec: JobRecord) -> JobRecord | None:
            # one write takes the lease and starts the attempt, when nothing says the job must end instead
            started[0] = self._startable(rec)
            return self._mark_started(rec) if started[0] else None

        job = await asyncio.to_thread(self._store.try_acquire_lease, job_id, self.owner,
                                      self._cfg.lease_s, self._clock(), start)
        if job is None:
            return  # another replica owns it, or it already ended
        # this task's own context (empty at its start): every line it, and what it starts, logs carries the job
        bind_job(job.id, job.tenant)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job_id))
        try:
            await self._attempt_until_done(job, started=started[0])
        except asyncio.CancelledError:
            raise  # replica shutting down: `stop` hands the lease back so another replica resumes
        except StorageError:
            # S3 kept failing (after retries): the job cannot be moved now; its lease lapses and a
            # replica resumes it when S3 answers again. Failing it would need S3 too, and lose the work.
            log.warning("job %s: job store unavailable; leaving it to be reclaimed", job_id, exc_info=True)
        except Exception:  # never leave an accepted job stuck on a bug in this loop
            log.exception("job %s: runner error", job_id)
            await self._finish(job_id, "failed", error={"code": "internal_error",
                                                        "message": "the job runner failed"})
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    def _startable(self, job: JobRecord) -> bool:
        """Whether `job` may start an attempt now (else the loop ends it: cancelled, past its deadline, no attempts
        left)."""
        return not (job.cancel_requested or job.deleted or job.is_terminal
                    or (job.deadline_at is not None and self._clock() >= job.deadline_at)
                    or job.attempts >= self._cfg.max_attempts)

    async def _attempt_until_done(self, job: JobRecord, started: bool = False) -> None:
        """`started`: the lease's write already started the first attempt (`job` is that record)."""
        job_id = job.id
        # what a job reclaimed with no attempts left reports: its earlier replicas stopped mid-attempt
        error: tuple[str, str] = ("internal_error", "the replica running its last attempt stopped before it finished")
        while True:
            if not started:
                if job.cancel_requested or job.deleted:
                    await self._finish(job_id, "cancelled", error={"code": "cancelled",
                                                                   "message": "the job was cancelled"})
                    return
                if job.deadline_at is not None and self._clock() >= job.deadline_at:
                    await self._finish(job_id, "failed", error={
                        "code": "deadline_exceeded", "message": "the job did not finish before its deadline"})
                    return
                if job.attempts >= self._cfg.max_attempts:
                    code, message = error
                    await self._finish(job_id, "failed", error={
                        "code": code, "message": f"{message} (after {job.attempts} attempts)"})
                    return
                try:
                    job = await self._store_call(self._store.update, job_id, self._mark_started)
                except _LeaseLost:
                    log.warning("job %s: another replica took it over; not starting another attempt here", job_id)
                    return
                if job.cancel_requested or job.deleted:
                    continue  # cancelled while we took the lease: end it at the top of the loop
            started = False
            self._events.attempt_started(job, self._clock())
            if job.attempts > 1:  # the first attempt has no earlier attempt's progress to clear
                await self._store_call(self._store.clear_progress, job_id)
            attempt = asyncio.get_running_loop().create_task(self._pipeline.run(job))
            self._attempts[job_id] = attempt
            try:
                timeout = self._cfg.attempt_timeout_s
                if job.deadline_at is not None:
                    timeout = max(0.0, min(timeout, job.deadline_at - self._clock()))
                out = await asyncio.wait_for(attempt, timeout)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the runner itself is being stopped
                job = await self._reread(job)
                if job.cancel_requested or job.deleted:
                    continue  # finish as cancelled at the top of the loop
                error = ("internal_error", "the attempt was interrupted")
                self._events.attempt_failed(job, error[0])
            except NonRetryableError as exc:
                self._events.attempt_failed(job, exc.code)
                await self._finish(job_id, "failed", error={"code": exc.code, "message": exc.message})
                return
            except Exception as exc:  # noqa: BLE001 - every stage failure is retried, bounded
                error = describe_failure(exc)
                self._events.attempt_failed(job, error[0])
                log.warning("job %s attempt %d failed: %s: %s", job_id, job.attempts, type(exc).__name__, exc)
            else:
                self._free_slot(job_id)  # the stages are done with it: the next queued job starts now
                self._dispatch()
                if isinstance(out, dict):  # a VaeDecoder replica of the previous release (rolling upgrade)
                    out = ChainResult(JobResult(**out["result"]), dict(out.get("timings") or {}))
                await self._finish(job_id, "completed", result=out.result, timings=out.timings,
                                   gpus=getattr(out, "gpus", {}))  # a previous release's result has none
                return
            finally:
                self._attempts.pop(job_id, None)
            await asyncio.sleep(self._cfg.retry_backoff_s * (1 + random.random()) * job.attempts)
            job = await self._reread(job)

    async def _store_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A job-store call retried over a short S3 outage (botocore already retries each request)."""
        for delay in (0.5, 1.0, 2.0, 4.0):
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except StorageError as exc:
                if isinstance(exc, (PreconditionFailed, NotFound)):
                    raise
                log.warning("job store call %s failed (%s); retrying in %.1f s", fn.__name__, exc, delay)
                await asyncio.sleep(delay)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _reread(self, job: JobRecord) -> JobRecord:
        """The current record; a vanished one (DELETE removed it) reads as deleted."""
        fresh = await self._store_call(self._store.get, job.id, include_deleted=True)
        return fresh if fresh is not None else job.model_copy(update={"deleted": True})

    def _mark_started(self, job: JobRecord) -> JobRecord:
        # checked inside the compare-and-swap: a replica that lost the lease must not run (or count) an attempt
        if job.lease_owner != self.owner:
            raise _LeaseLost
        if job.cancel_requested or job.deleted or job.is_terminal:
            return None  # nothing to start; the loop reads the record again and ends it
        now = self._clock()
        return job.model_copy(update={
            "status": "in_progress", "attempts": job.attempts + 1, "stage": TEXT_ENCODER.phase, "step": 0,
            "started_at": job.started_at or int(now), "updated_at": now,
        })

    async def _finish(self, job_id: str, status: str, *, error: dict[str, str] | None = None,
                      result: JobResult | None = None, timings: dict[str, float] | None = None,
                      gpus: dict[str, float] | None = None) -> None:
        # a finish already under way must land before `stop` may hand the lease back (else it is skipped)
        def finish() -> JobRecord | None:
            self._finishing.add(job_id)
            try:
                return self._store.finish(
                    job_id, self.owner, status, error=JobError(**error) if error else None,
                    result=result, timings=timings, gpus=gpus, bill=self.bills_usage, notify=self.notify_for,
                    notify_claim_s=self.notify_claim_s)
            finally:  # in the thread: also when the awaiting task was cancelled meanwhile
                self._finishing.discard(job_id)

        self._ending.add(job_id)
        self._finishing.add(job_id)
        try:
            job = await self._store_call(finish)
            if job is not None:
                # shielded: a cancel of this task (shutdown) must not cut the release/usage/webhook short
                await asyncio.shield(self.finished(job))
        finally:
            self._ending.discard(job_id)
        log.info("job %s %s", job_id, status if job is not None else f"{status} (not recorded: lease lost or deleted)")

    async def _heartbeat(self, job_id: str) -> None:
        renewed = self._clock()
        while True:
            await asyncio.sleep(self._cfg.heartbeat_s)
            if job_id in self._ending:
                return  # the terminal write is under way; a renewal now would read as "lease lost"
            try:
                job = await asyncio.to_thread(self._store.renew_lease, job_id, self.owner, self._cfg.lease_s)
            except Exception:  # noqa: BLE001 - S3 hiccup: try again next beat, the lease has slack
                log.warning("job %s: lease renewal failed", job_id, exc_info=True)
                if self._clock() - renewed > self._cfg.lease_s:
                    # our lease has lapsed unrenewed: another replica may run the job now; stop here
                    log.warning("job %s: lease lapsed without renewal; stopping here", job_id)
                    self._tasks.get(job_id) and self._tasks[job_id].cancel()
                    return
                continue
            if job_id in self._ending:
                return
            if job is None:
                log.warning("job %s: lease lost; stopping here", job_id)
                self._tasks.get(job_id) and self._tasks[job_id].cancel()
                return
            renewed = self._clock()
            if job.cancel_requested or job.deleted:
                self.cancel_local(job_id)

    # -- orphans ---------------------------------------------------------------------------------
    async def _reclaim_loop(self) -> None:
        while True:
            try:
                await self.reclaim_once()
            except Exception:  # noqa: BLE001
                log.warning("reclaim scan failed", exc_info=True)
            await asyncio.sleep(self._cfg.reclaim_interval_s * (0.5 + random.random()))

    async def reclaim_once(self) -> list[str]:
        """Take over every active job whose lease is free or expired; returns the ids submitted."""
        now = self._clock()
        taken = []
        waiting: list[tuple[str, str]] = []
        running = 0
        for job_id in await asyncio.to_thread(self._store.list_active_ids):
            if job_id in self._tasks:
                running += 1
                continue
            job = await asyncio.to_thread(self._store.get, job_id)
            if job is not None and job.status == "queued":
                waiting.append((job_id, job.tenant))
            elif job is not None and job.status == "in_progress":
                running += 1
            if job is None:
                # `create` writes the marker just before the record: give a young marker time
                if now - job_created_ms(job_id) / 1000 > 2 * self._cfg.lease_s:
                    await asyncio.to_thread(self._store.drop_active, job_id)
                continue
            if job.is_terminal:
                if job.obligations_pending:  # the marker is the outbox entry: settle what is owed, then it goes
                    if job.billing == "pending":
                        await self._settle(job, now)
                    hook = job.webhook
                    if (hook is not None and hook.state == "pending" and (hook.claimed_until or 0) <= now
                            and self._on_unnotified is not None):
                        try:
                            await self._on_unnotified(job)
                        except Exception:  # noqa: BLE001 - still pending: the next scan tries again
                            log.warning("job %s: webhook still pending", job_id, exc_info=True)
                    continue
                await asyncio.to_thread(self._store.drop_active, job_id)
                continue
            if job.lease_is_free(now):
                self.submit(job_id, job.tenant, job.model)
                taken.append(job_id)
        self.backlog = (Backlog(now, tuple(sorted(waiting)), running) if self.backlog is None
                        else self.backlog.after_scan(now, waiting, running))
        return taken
