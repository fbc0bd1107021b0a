"""JobRunner against a real JobStore on the local moto S3, with fake pipelines injected through the constructor.

No Ray, no torch. Tests are plain functions around `asyncio.run` (pytest-asyncio is not installed) and wait for
conditions with a deadline rather than fixed sleeps, so a busy machine makes them slower, not flaky.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serve.config import AppConfig, JobsConfig, S3Config
from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
from serve.jobs.runner import JobRunner, NonRetryableError, describe_failure
from serve.jobs.service import video_keys
from serve.jobs.store import JobStore
from serve.jobs.wiring import build_ingress
from serve.logcontext import JobLogContext, JobLogFilter, current_job, job_context
from serve.stages.stage import StageFailed, StageUnavailable
from serve.storage import Storage
from tests.params import example_params

TIMEOUT_S = 20.0  # generous: another process may be loading the CPUs


def jobs_config(**overrides: Any) -> JobsConfig:
    fields: dict[str, Any] = {"max_attempts": 3, "lease_s": 1.5, "heartbeat_s": 0.2, "reclaim_interval_s": 0.2,
                              "retry_backoff_s": 0, "attempt_timeout_s": 60}
    return JobsConfig(**{**fields, **overrides})


# ---- fake pipelines -------------------------------------------------------------------------------------------


def result_of(job_id: str) -> dict[str, str]:
    return {"video_key": f"videos/{job_id}.mp4", "cover_key": f"videos/{job_id}.jpg",
            "metadata_key": f"videos/{job_id}.json"}


TIMINGS = {"text_encoder_s": 0.1, "denoiser_s": 1.5, "vae_decoder_s": 0.2}


class Succeeds:
    """Returns result keys at once (writes nothing)."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        return ChainResult(JobResult(**result_of(job.id)), dict(TIMINGS))


class SlowSucceeds(Succeeds):
    """Succeeds after a short while, so that two runners racing for one job overlap."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return ChainResult(JobResult(**result_of(job.id)), dict(TIMINGS))


class FailsThenSucceeds(Succeeds):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def run(self, job: JobRecord) -> ChainResult:
        if self.calls < self.failures:
            self.calls += 1
            raise RuntimeError("TextEncoder request failed: connection reset")
        return await super().run(job)


class AlwaysFails:
    MESSAGE = "ActorDiedError: the Denoiser replica died unexpectedly (actor 3f2a, node 10.0.0.7)"
    # what the chain raises for it: typed, client-safe (the Ray error's text stays in the logs)
    ERROR = StageUnavailable("Denoiser", "ActorDiedError")

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        raise self.ERROR


class RejectsRequest:
    def __init__(self) -> None:
        self.calls = 0

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        raise NonRetryableError("prompt_too_long", "the prompt encodes to more than 226 tokens")


class Hangs:
    """Blocks until cancelled (or `release` is set); counts the CancelledErrors it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, job: JobRecord) -> ChainResult:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ChainResult(JobResult(**result_of(job.id)), dict(TIMINGS))


class FailsOnSignalThenHangs(Hangs):
    """First call: blocks until `fail_now` is set, then raises. Later calls: hang like `Hangs`."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_now = asyncio.Event()

    async def run(self, job: JobRecord) -> ChainResult:
        if self.calls == 0:
            self.calls += 1
            self.started.set()
            await self.fail_now.wait()
            raise RuntimeError("TextEncoder request failed: connection reset")
        return await super().run(job)


class Clock:
    """A replica's clock the test sets by hand (only the runner gets it; the store keeps real time)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ReplicaLoop:
    """Another ingress replica's event loop, in its own thread; `kill` freezes it the way a process dies."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._executor = ThreadPoolExecutor(max_workers=4)  # its S3 calls, to wait for those in flight at death
        self.loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self.loop.run_forever, name="replica-a", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def kill(self) -> None:
        """Nothing runs on this loop from now on (not even `finally` blocks); S3 calls in flight still land."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self._executor.shutdown(wait=True)

    def close(self) -> None:
        """Test cleanup: cancel what the dead replica left behind, off the test's own loop."""
        if self._thread.is_alive():
            self.kill()

        def reap() -> None:
            tasks = asyncio.all_tasks(self.loop)
            for t in tasks:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

        reaper = threading.Thread(target=reap)
        reaper.start()
        reaper.join()


# ---- helpers --------------------------------------------------------------------------------------------------


@pytest.fixture
def store(storage: Storage) -> JobStore:
    return JobStore(storage, retention_s=3600)


def make_job(store: JobStore, **fields: Any) -> JobRecord:
    now = time.time()
    record = JobRecord(id=new_job_id(int(now * 1000)), created_at=int(now), model="cogvideox-tiny-2b",
                       prompt="a cat on a skateboard", params=example_params(num_inference_steps=4, seed=1),
                       total_steps=4, **fields)
    return store.create(record)


async def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    """Poll `predicate` (plain or async) until it is truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def read(store: JobStore, job_id: str) -> JobRecord | None:
    return await asyncio.to_thread(store.get, job_id, include_deleted=True)


async def until_ended(store: JobStore, job_id: str, *runners: JobRunner) -> JobRecord:
    """The terminal record, once every runner has also let go of the job (so call counts are final)."""

    async def ended() -> JobRecord | None:
        rec = await read(store, job_id)
        return rec if rec is not None and rec.is_terminal else None

    rec = await wait_for(ended, f"job {job_id} to end")

    await wait_for(lambda: all(job_id not in r.running for r in runners), f"runners to let go of {job_id}")
    return rec


async def drive_to_end(store: JobStore, pipeline, cfg: JobsConfig) -> JobRecord:
    """Submit a fresh job to one runner and return its record once it has ended."""
    job = make_job(store)
    runner = JobRunner(store, pipeline, cfg, owner="ingress-a")
    try:
        runner.submit(job.id, job.tenant)
        return await until_ended(store, job.id, runner)
    finally:
        await runner.stop()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# ---- describe_failure ---------------------------------------------------------------------------------------


def test_describe_failure_is_client_safe() -> None:
    assert describe_failure(AlwaysFails.ERROR) == (
        "replica_died", "the Denoiser replica running this job stopped before it finished")
    code, message = describe_failure(StageFailed("VaeDecoder", "ValueError"))
    assert code == "stage_error" and "10.0.0.7" not in message and "VaeDecoder" in message
    # classified by type, never by text: an untyped error that names a stage is still an internal one
    assert describe_failure(RuntimeError(AlwaysFails.MESSAGE)) == ("internal_error", "generation failed (RuntimeError)")
    assert describe_failure(asyncio.TimeoutError())[0] == "stage_timeout"
    assert describe_failure(KeyError("x")) == ("internal_error", "generation failed (KeyError)")
    assert describe_failure(NonRetryableError("prompt_too_long", "too long")) == ("prompt_too_long", "too long")


# ---- one runner ---------------------------------------------------------------------------------------------


def test_queued_job_is_driven_to_completed(store: JobStore) -> None:
    async def main() -> None:
        job = make_job(store)
        assert store.list_active_ids() == [job.id]
        pipeline = Succeeds()
        runner = JobRunner(store, pipeline, jobs_config(), owner="ingress-a")
        try:
            runner.submit(job.id, job.tenant)
            rec = await until_ended(store, job.id, runner)
        finally:
            await runner.stop()
        assert rec.status == "completed" and rec.progress == 100 and rec.error is None
        assert rec.result is not None and rec.result.model_dump() == result_of(job.id)
        assert rec.timings == TIMINGS
        assert rec.attempts == 1 and pipeline.calls == 1
        assert rec.lease_owner is None and rec.lease_expires_at is None
        assert rec.started_at is not None and rec.completed_at is not None and rec.expires_at is not None
        assert store.list_active_ids() == []
        assert not store.storage.exists(store.active_key(job.id))

    run(main())


def test_failing_chain_is_retried_as_a_whole_until_it_succeeds(store: JobStore) -> None:
    async def main() -> None:
        pipeline = FailsThenSucceeds(failures=2)
        rec = await drive_to_end(store, pipeline, jobs_config(max_attempts=3))
        assert rec.status == "completed" and rec.error is None
        assert rec.attempts == 3 and pipeline.calls == 3

    run(main())


# what a server keeps per request in a context variable (Ray Serve: its request context, whose id the stage calls
# made under it carry, and whose cancellation cancels them)
A_SERVERS_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("a_servers_request", default=None)


class LogsWhatItRunsUnder(FailsThenSucceeds):
    """Fails once, then succeeds; logs from inside the chain and notes the job and request it ran under."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(failures=1)
        self.logger = logger
        self.seen: list[tuple[JobLogContext | None, str | None]] = []

    async def run(self, job: JobRecord) -> ChainResult:
        self.seen.append((current_job(), A_SERVERS_REQUEST.get()))
        self.logger.info("chain for %s", job.id)
        return await super().run(job)


def test_every_line_logged_while_driving_a_job_carries_its_id_and_tenant(store: JobStore) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(JobLogFilter())
    loggers = [logging.getLogger("serve.jobs.runner"), logging.getLogger("tests.unit.fake_chain")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.setLevel(logging.INFO)

    async def main() -> tuple[JobRecord, JobRecord, LogsWhatItRunsUnder]:
        job = make_job(store, tenant="acme")
        pipeline = LogsWhatItRunsUnder(loggers[1])
        runner = JobRunner(store, pipeline, jobs_config(), owner="ingress-a")
        try:
            # dispatched from inside another job's request: a create's dispatch may start any queued job
            token = A_SERVERS_REQUEST.set("the-request-of-another-job")
            with job_context(new_job_id(), "someone-else"):
                runner.submit(job.id, job.tenant)
            A_SERVERS_REQUEST.reset(token)
            rec = await until_ended(store, job.id, runner)
        finally:
            await runner.stop()
        loggers[1].info("after the job")
        return job, rec, pipeline

    try:
        job, rec, pipeline = asyncio.run(main())
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(keep)
            lg.setLevel(level)
    assert rec.status == "completed" and rec.attempts == 2
    messages = [r.getMessage() for r in records]
    assert f"chain for {job.id}" in messages and f"job {job.id} completed" in messages
    assert any(m.startswith(f"job {job.id} attempt 1 failed") for m in messages), messages
    about_the_job = [r for r in records if r.getMessage() != "after the job"]
    assert [(r.job_id, r.tenant) for r in about_the_job] == [(job.id, "acme")] * len(about_the_job)
    [after] = [r for r in records if r.getMessage() == "after the job"]
    assert not hasattr(after, "job_id")
    # the chain ran as the job's own work, not as part of the request that happened to dispatch it
    assert pipeline.seen == [(JobLogContext(job.id, "acme"), None)] * 2


def test_always_failing_chain_fails_after_max_attempts(store: JobStore) -> None:
    async def main() -> None:
        pipeline = AlwaysFails()
        rec = await drive_to_end(store, pipeline, jobs_config(max_attempts=3))
        assert rec.status == "failed" and rec.result is None
        assert rec.error is not None and rec.error.code == "replica_died"
        assert "Denoiser" in rec.error.message and "3 attempts" in rec.error.message
        assert "10.0.0.7" not in rec.error.message and "3f2a" not in rec.error.message  # nothing internal leaks
        assert rec.attempts == 3 and pipeline.calls == 3
        assert rec.lease_owner is None and store.list_active_ids() == []

    run(main())


def test_non_retryable_error_fails_after_one_attempt(store: JobStore) -> None:
    async def main() -> None:
        pipeline = RejectsRequest()
        rec = await drive_to_end(store, pipeline, jobs_config(max_attempts=3))
        assert rec.status == "failed" and rec.attempts == 1 and pipeline.calls == 1
        assert rec.error is not None and rec.error.model_dump() == {
            "code": "prompt_too_long", "message": "the prompt encodes to more than 226 tokens"}

    run(main())


def test_attempt_timeout_cancels_the_chain_and_counts_as_a_failed_attempt(store: JobStore) -> None:
    async def main() -> None:
        pipeline = Hangs()
        rec = await drive_to_end(store, pipeline, jobs_config(max_attempts=2, attempt_timeout_s=0.2))
        assert rec.status == "failed" and rec.error is not None and rec.error.code == "stage_timeout"
        assert rec.attempts == 2 and pipeline.calls == 2 and pipeline.cancelled == 2

    run(main())


# ---- cancel and delete --------------------------------------------------------------------------------------


def test_cancel_requested_elsewhere_is_seen_at_the_heartbeat(store: JobStore) -> None:
    async def main() -> None:
        job = make_job(store)
        pipeline = Hangs()
        runner = JobRunner(store, pipeline, jobs_config(), owner="ingress-a")
        try:
            runner.submit(job.id, job.tenant)
            await wait_for(pipeline.started.is_set, "the chain to start")

            def request_cancel(rec: JobRecord) -> JobRecord:
                rec.cancel_requested = True
                return rec

            # as another replica would: only the record changes, nobody calls this runner
            await asyncio.to_thread(store.update, job.id, request_cancel)
            rec = await until_ended(store, job.id, runner)
        finally:
            await runner.stop()
        assert rec.status == "cancelled" and rec.error is not None and rec.error.code == "cancelled"
        assert pipeline.cancelled == 1 and pipeline.calls == 1 and rec.attempts == 1
        assert rec.lease_owner is None and store.list_active_ids() == []

    run(main())


def test_delete_while_running_cancels_the_chain_and_does_not_retry(store: JobStore, s3_config: S3Config) -> None:
    async def main() -> None:
        cfg = jobs_config()
        job = make_job(store)
        pipeline = Hangs()
        graph = build_ingress(AppConfig(s3=s3_config, jobs=cfg), storage=store.storage, pipeline=pipeline,
                              owner="ingress-a")
        runner, service = graph.runner, graph.service
        try:
            runner.submit(job.id, job.tenant)
            await wait_for(pipeline.started.is_set, "the chain to start")
            deleted = await service.delete(job.id, job.tenant)
            assert deleted.id == job.id and deleted.deleted
            await wait_for(lambda: job.id not in runner.running, "the runner to let go")
            # a few heartbeats later: still one call, nothing was retried or resurrected
            await asyncio.sleep(3 * cfg.heartbeat_s)
            assert await runner.reclaim_once() == []
        finally:
            await runner.stop()
        assert pipeline.calls == 1 and pipeline.cancelled == 1
        assert await read(store, job.id) is None
        st = store.storage
        for prefix in ("jobs", "active", "index", "index-asc", "progress"):
            assert st.list_keys(st.key(prefix, "")) == [], prefix
        assert not any(st.exists(k) for k in video_keys(st, job.id).values())

    run(main())


# ---- several replicas -----------------------------------------------------------------------------------------


def test_dead_ingress_job_is_taken_over_after_its_lease_expires(store: JobStore) -> None:
    async def main() -> None:
        cfg = jobs_config(lease_s=1.0, heartbeat_s=0.1)
        job = make_job(store)
        hang, finish = Hangs(), Succeeds()
        ingress_a = ReplicaLoop()
        runner_a = JobRunner(store, hang, cfg, owner="ingress-a")
        b_clock = Clock(time.time())
        runner_b = JobRunner(store, finish, cfg, owner="ingress-b", clock=b_clock)
        try:
            ingress_a.call(runner_a.submit, job.id, job.tenant)
            await wait_for(hang.started.is_set, "A's chain to start")
            first = await read(store, job.id)
            assert first is not None and first.lease_owner == "ingress-a" and first.attempts == 1

            async def renewed() -> bool:
                rec = await read(store, job.id)
                return rec is not None and rec.lease_expires_at > first.lease_expires_at  # type: ignore[operator]

            await wait_for(renewed, "A's heartbeat to renew the lease")

            ingress_a.kill()  # A's process dies: nothing of it runs on, its lease is no longer renewed
            held = await read(store, job.id)
            assert held is not None and held.status == "in_progress" and held.lease_owner == "ingress-a"
            await asyncio.sleep(3 * cfg.heartbeat_s)
            still = await read(store, job.id)
            assert still is not None and still.lease_expires_at == held.lease_expires_at

            assert held.lease_expires_at is not None
            b_clock.t = held.lease_expires_at - 0.05
            assert await runner_b.reclaim_once() == []  # A's lease still runs: hands off
            b_clock.t = held.lease_expires_at + 0.01
            assert await runner_b.reclaim_once() == [job.id]
            rec = await until_ended(store, job.id, runner_b)
        finally:
            ingress_a.close()
            await runner_b.stop()
        assert rec.status == "completed" and rec.result is not None
        assert rec.attempts == 2  # A's interrupted attempt counts
        assert hang.calls == 1 and finish.calls == 1
        assert rec.started_at == first.started_at

    run(main())


def test_stopped_ingress_hands_its_job_over_at_once(store: JobStore) -> None:
    async def main() -> None:
        cfg = jobs_config(lease_s=30, heartbeat_s=0.2)  # the lease would not expire during the test
        job = make_job(store)
        hang, finish = Hangs(), Succeeds()
        runner_a = JobRunner(store, hang, cfg, owner="ingress-a")
        runner_b = JobRunner(store, finish, cfg, owner="ingress-b")
        try:
            runner_a.submit(job.id, job.tenant)
            await wait_for(hang.started.is_set, "A's chain to start")
            assert await runner_b.reclaim_once() == []  # A holds it
            await runner_a.stop()  # graceful shutdown: the chain is cancelled and the lease given back
            assert hang.cancelled == 1
            released = await read(store, job.id)
            assert released is not None and released.status == "in_progress" and released.lease_owner is None
            assert await runner_b.reclaim_once() == [job.id]
            rec = await until_ended(store, job.id, runner_b)
        finally:
            await runner_a.stop()
            await runner_b.stop()
        assert rec.status == "completed" and rec.attempts == 1  # a graceful stop refunds the interrupted attempt
        assert hang.calls == 1 and finish.calls == 1

    run(main())


def test_replica_that_lost_its_lease_starts_no_new_attempt(store: JobStore) -> None:
    # A's renewals did not land for a whole lease (S3 trouble, a stalled loop), so B took the job over. When A's
    # in-flight attempt then fails, A must not start another chain: B runs the job, and A must not spend its attempts.
    async def main() -> None:
        slow_beat = jobs_config(lease_s=10, heartbeat_s=5)  # A's heartbeat stays out of the way during the test
        job = make_job(store)
        a_pipeline, b_pipeline = FailsOnSignalThenHangs(), Hangs()
        runner_a = JobRunner(store, a_pipeline, slow_beat, owner="ingress-a")
        b_clock = Clock(time.time())
        runner_b = JobRunner(store, b_pipeline, jobs_config(), owner="ingress-b", clock=b_clock)
        try:
            runner_a.submit(job.id, job.tenant)
            await wait_for(a_pipeline.started.is_set, "A's chain to start")
            held = await read(store, job.id)
            assert held is not None and held.lease_expires_at is not None
            b_clock.t = held.lease_expires_at + 0.01
            assert await runner_b.reclaim_once() == [job.id]
            await wait_for(b_pipeline.started.is_set, "B's chain to start")

            a_pipeline.fail_now.set()
            await wait_for(lambda: job.id not in runner_a.running or a_pipeline.calls > 1,
                           "A to stop or retry")
            rec = await read(store, job.id)
        finally:
            await runner_a.stop()
            await runner_b.stop()
        assert a_pipeline.calls == 1, "A started a second chain for a job B owns"
        assert rec is not None and rec.lease_owner == "ingress-b" and rec.attempts == 2

    run(main())


def test_attempts_are_durable_across_replicas(store: JobStore) -> None:
    async def main() -> None:
        cfg = jobs_config(max_attempts=3)
        job = make_job(store, status="in_progress", stage="denoising", attempts=3, lease_owner="ingress-dead",
                       lease_expires_at=time.time() - 1)
        pipeline = Succeeds()
        runner = JobRunner(store, pipeline, cfg, owner="ingress-b")
        try:
            assert await runner.reclaim_once() == [job.id]
            rec = await until_ended(store, job.id, runner)
        finally:
            await runner.stop()
        assert pipeline.calls == 0
        assert rec.status == "failed" and rec.attempts == 3
        assert rec.error is not None and rec.error.message == (
            "the replica running its last attempt stopped before it finished (after 3 attempts)")
        assert store.list_active_ids() == []

    run(main())


def test_reclaim_starts_unowned_jobs_and_drops_markers_of_ended_ones(store: JobStore) -> None:
    async def main() -> None:
        queued = make_job(store)  # accepted by a replica that died before submitting it
        ended = make_job(store)
        store.finish(ended.id, None, "completed", result=None)
        store.storage.put_bytes(store.active_key(ended.id), b"", "application/octet-stream")  # a leftover marker
        pipeline = Succeeds()
        runner = JobRunner(store, pipeline, jobs_config(), owner="ingress-b")
        try:
            assert await runner.reclaim_once() == [queued.id]
            rec = await until_ended(store, queued.id, runner)
        finally:
            await runner.stop()
        assert rec.status == "completed" and pipeline.calls == 1
        assert store.list_active_ids() == []

    run(main())


def test_two_runners_racing_for_a_job_run_it_once(store: JobStore) -> None:
    async def main() -> None:
        cfg = jobs_config()
        jobs = [make_job(store) for _ in range(3)]
        pipeline = SlowSucceeds(delay_s=0.2)  # shared: counts the chains both replicas start
        runners = [JobRunner(store, pipeline, cfg, owner=f"ingress-{n}") for n in ("a", "b")]
        try:
            for i, job in enumerate(jobs):
                for r in runners[i % 2:] + runners[: i % 2]:  # alternate who submits first
                    r.submit(job.id, job.tenant)
            records = [await until_ended(store, job.id, *runners) for job in jobs]
        finally:
            for r in runners:
                await r.stop()
        assert [r.status for r in records] == ["completed"] * 3
        assert [r.attempts for r in records] == [1, 1, 1]
        assert pipeline.calls == 3

    run(main())



# ---- fairness ---------------------------------------------------------------------------------------------------


class RecordsOrder(SlowSucceeds):
    """Succeeds after a short while and remembers the order in which jobs started."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.started: list[str] = []

    async def run(self, job: JobRecord) -> ChainResult:
        self.started.append(job.tenant)
        return await super().run(job)


def test_one_tenants_burst_does_not_delay_another_tenants_job(store: JobStore) -> None:
    async def main() -> None:
        pipeline = RecordsOrder(delay_s=0.05)
        runner = JobRunner(store, pipeline, jobs_config(max_concurrent_per_replica=1), owner="ingress-a")
        try:
            burst = [make_job(store, tenant="bursty") for _ in range(5)]
            single = make_job(store, tenant="quiet")
            for job in burst:
                runner.submit(job.id, job.tenant)
            runner.submit(single.id, single.tenant)
            rec = await until_ended(store, single.id, runner)
            for job in burst:
                await until_ended(store, job.id, runner)
        finally:
            await runner.stop()
        assert rec.status == "completed"
        # one slot, FIFO would start the quiet tenant's job sixth; round-robin starts it within the first
        # three (the burst's first job took the free slot, its second was queued before the quiet one)
        assert pipeline.started.index("quiet") <= 2 and pipeline.started.count("bursty") == 5

    run(main())


def test_a_previous_release_stage_chain_result_still_completes_the_job(store: JobStore) -> None:
    """During a rolling upgrade a VaeDecoder replica of the previous release answers with a dict."""

    class OldVaeDecoder(Succeeds):
        async def run(self, job: JobRecord) -> dict[str, Any]:  # type: ignore[override]
            self.calls += 1
            return {"result": result_of(job.id), "timings": dict(TIMINGS)}

    async def main() -> None:
        rec = await drive_to_end(store, OldVaeDecoder(), jobs_config())
        assert rec.status == "completed" and rec.result is not None
        assert rec.result.video_key == result_of(rec.id)["video_key"] and rec.timings == TIMINGS

    run(main())
