"""Admission limits (serve/admission/limits.py) with a fake clock: rate, concurrency, daily GPU quota, overload, isolation,
persistence and the fair dispatch queue. Pure logic: no S3, no Ray."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from serve.admission.limits import (
    Decision,
    LimiterState,
    LocalLimiter,
    retry_after,
    utc_day,
)
from serve.config.limits import LimitsConfig, TenantLimits
from serve.errors import ServiceError
from serve.jobs.queue import FairQueue
from tests.clock import Clock

NOON = datetime(2025, 6, 15, 12, 0, 0, tzinfo=timezone.utc).timestamp()
UNLIMITED = TenantLimits(requests_per_minute=None, max_concurrent_jobs=None, daily_gpu_seconds=None)


def state(clock: Clock, **cfg: object) -> LimiterState:
    return LimiterState(LimitsConfig(**{"max_outstanding_jobs": None, **cfg}), clock)


def refused(d: Decision, status: int, code: str) -> None:
    assert not d.allowed, d
    assert (d.status, d.code) == (status, code), d
    assert d.headers["Retry-After"] == str(d.retry_after_s)


# ---- rate ------------------------------------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_refuses_until_it_refills() -> None:
    clock = Clock(NOON)
    s = state(clock)
    limits = TenantLimits(requests_per_minute=6, burst=2)  # one token every 10 s
    assert s.admit("acme", limits).allowed and s.admit("acme", limits).allowed
    d = s.admit("acme", limits)
    refused(d, 429, "rate_limited")
    assert d.retry_after_s == 10 and "6 requests per minute" in d.message
    clock.advance(9.5)
    d = s.admit("acme", limits)
    refused(d, 429, "rate_limited")
    assert d.retry_after_s == 1  # 0.5 s rounds up, never 0
    clock.advance(0.5)
    assert s.admit("acme", limits).allowed
    refused(s.admit("acme", limits), 429, "rate_limited")
    clock.advance(20)  # a full refill gives the whole burst again, not more
    assert [s.admit("acme", limits).allowed for _ in range(3)] == [True, True, False]


def test_refused_requests_cost_no_token() -> None:
    clock = Clock(NOON)
    s = state(clock)
    limits = TenantLimits(requests_per_minute=60, burst=1)
    assert s.admit("acme", limits).allowed
    for _ in range(5):
        refused(s.admit("acme", limits), 429, "rate_limited")
    clock.advance(1)
    assert s.admit("acme", limits).allowed


def test_rate_limit_headers_track_the_bucket() -> None:
    clock = Clock(NOON)
    s = state(clock)
    limits = TenantLimits(requests_per_minute=6, burst=2)
    first = s.admit("acme", limits)
    assert first.headers == {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "10"}
    second = s.admit("acme", limits)
    assert second.headers == {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "20"}
    third = s.admit("acme", limits)
    assert third.headers["X-RateLimit-Remaining"] == "0" and third.headers["Retry-After"] == "10"
    clock.advance(15)
    d = s.admit("acme", limits, charge_rate=False)  # look without taking
    assert (d.headers["X-RateLimit-Remaining"], d.headers["X-RateLimit-Reset"]) == ("1", "5")
    # the default burst is one minute's worth
    assert TenantLimits(requests_per_minute=30).bucket_size == 30
    assert s.admit("other", TenantLimits(requests_per_minute=30)).headers["X-RateLimit-Limit"] == "30"


@pytest.mark.parametrize("wait", [0.0, 0.001, 0.1, 0.999, 1.0, 1.2, 59.5])
def test_retry_after_is_whole_seconds_and_at_least_one(wait: float) -> None:
    secs = retry_after(wait)
    assert isinstance(secs, int) and secs >= 1 and secs >= wait and secs - wait < 1 + 1e-6


def test_a_fast_bucket_still_says_retry_after_one_second() -> None:
    s = state(Clock(NOON))
    limits = TenantLimits(requests_per_minute=600, burst=1)  # a token every 0.1 s
    assert s.admit("acme", limits).allowed
    d = s.admit("acme", limits)
    refused(d, 429, "rate_limited")
    assert d.headers["Retry-After"] == "1" and d.retry_after_s == 1


# ---- concurrency -----------------------------------------------------------------------------------------------


def test_concurrent_jobs_are_limited_until_one_is_released() -> None:
    s = state(Clock(NOON), concurrency_retry_after_s=7)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=2)
    assert s.admit("acme", limits, "j1").allowed and s.admit("acme", limits, "j2").allowed
    d = s.admit("acme", limits, "j3")
    refused(d, 429, "concurrency_limited")
    assert d.retry_after_s == 7 and "limit is 2" in d.message
    assert s.active_jobs("acme") == {"j1", "j2"}
    # a retried admit of a job already held reserves nothing more
    assert s.admit("acme", limits, "j2").allowed and s.outstanding() == 2
    assert s.release("acme", "j1") is True and s.release("acme", "j1") is False
    assert s.release("acme", "unknown") is False
    assert s.admit("acme", limits, "j3").allowed
    assert s.active_jobs("acme") == {"j2", "j3"}


def test_rate_only_admission_reserves_no_job() -> None:
    s = state(Clock(NOON))
    limits = TenantLimits(requests_per_minute=60, max_concurrent_jobs=1)
    for _ in range(3):
        assert s.admit("acme", limits).allowed  # e.g. GET polling
    assert s.outstanding() == 0 and s.admit("acme", limits, "j1").allowed


# ---- daily GPU quota -------------------------------------------------------------------------------------------


def test_daily_quota_refuses_until_the_next_utc_day() -> None:
    clock = Clock(NOON)
    s = state(clock)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=None, daily_gpu_seconds=100)
    s.charge_gpu_seconds("acme", 60)
    assert s.admit("acme", limits, "j1").allowed
    s.release("acme", "j1")
    assert s.charge_gpu_seconds("acme", 40) == 100
    d = s.admit("acme", limits, "j2")
    refused(d, 429, "quota_exceeded")
    assert d.retry_after_s == 12 * 3600  # noon -> midnight UTC
    assert "100 GPU-seconds" in d.message
    # yesterday's charges do not count today
    s.charge_gpu_seconds("acme", 500, day="2025-06-14")
    clock.advance(12 * 3600 - 1)
    refused(s.admit("acme", limits, "j2"), 429, "quota_exceeded")
    clock.advance(1)  # 00:00:00 UTC
    assert utc_day(clock()) == "2025-06-16"
    assert s.gpu_seconds_used("acme") == 0 and s.gpu_seconds_used("acme", "2025-06-15") == 100
    assert s.admit("acme", limits, "j2").allowed


def test_estimates_of_running_jobs_count_against_the_quota() -> None:
    clock = Clock(NOON)
    s = state(clock, concurrency_retry_after_s=5)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=None, daily_gpu_seconds=100)
    assert s.admit("acme", limits, "a", estimated_gpu_s=70).allowed
    d = s.admit("acme", limits, "b", estimated_gpu_s=40)
    refused(d, 429, "quota_exceeded")
    assert d.retry_after_s == 5  # it fits once "a" ends: retry soon, not tomorrow
    big = s.admit("acme", limits, "c", estimated_gpu_s=150)
    refused(big, 429, "quota_exceeded")
    assert big.retry_after_s == 12 * 3600
    s.release("acme", "a")
    s.charge_gpu_seconds("acme", 50)
    assert s.admit("acme", limits, "b", estimated_gpu_s=40).allowed


# ---- overload --------------------------------------------------------------------------------------------------


def test_overload_is_503_not_a_tenant_limit_and_costs_no_rate_token() -> None:
    s = state(Clock(NOON), max_outstanding_jobs=3, fair_share_above=1.0, overload_retry_after_s=9)
    for i, tenant in enumerate(["a", "b", "c"]):
        assert s.admit(tenant, UNLIMITED, f"j{i}").allowed
    limits = TenantLimits(requests_per_minute=60, burst=1, max_concurrent_jobs=10)
    d = s.admit("d", limits, "jd")
    refused(d, 503, "overloaded")
    assert d.retry_after_s == 9 and "capacity" in d.message
    assert s.admit("d", limits).allowed  # the rate token came back
    s.release("a", "j0")
    assert s.admit("d", limits, "jd", charge_rate=False).allowed


def test_a_tenant_at_its_own_limit_hears_429_even_when_the_service_is_full() -> None:
    s = state(Clock(NOON), max_outstanding_jobs=1, fair_share_above=1.0)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=1)
    assert s.admit("a", limits, "j1").allowed
    refused(s.admit("a", limits, "j2"), 429, "concurrency_limited")
    refused(s.admit("b", limits, "j3"), 503, "overloaded")


def test_one_tenants_burst_leaves_room_for_others() -> None:
    s = state(Clock(NOON), max_outstanding_jobs=10, fair_share_above=0.5)
    admitted = [s.admit("heavy", UNLIMITED, f"h{i}").allowed for i in range(10)]
    assert admitted == [True] * 5 + [False] * 5  # a tenant alone stops at the watermark
    refused(s.admit("heavy", UNLIMITED, "h99"), 503, "overloaded")
    assert s.admit("light", UNLIMITED, "l1").allowed
    assert s.admit("light", UNLIMITED, "l2").allowed


# ---- isolation -------------------------------------------------------------------------------------------------


def test_one_tenant_at_its_limits_does_not_change_anothers_decisions() -> None:
    limits = TenantLimits(requests_per_minute=60, burst=2, max_concurrent_jobs=1, daily_gpu_seconds=10)
    busy, fresh = state(Clock(NOON)), state(Clock(NOON))
    # tenant "a" exhausts every limit it has
    assert busy.admit("a", limits, "a1").allowed and busy.admit("a", limits).allowed
    refused(busy.admit("a", limits, "a2"), 429, "rate_limited")
    busy.charge_gpu_seconds("a", 10)
    busy.release("a", "a1")
    busy._tat.pop("a")  # noqa: SLF001 - refill a's bucket so the quota, not the rate, answers next
    refused(busy.admit("a", limits, "a3"), 429, "quota_exceeded")
    # tenant "b" sees exactly what it sees on a service nobody else uses
    for state_ in (busy, fresh):
        state_.charge_gpu_seconds("b", 3)
    for call in [("b1",), (None,), ("b2",), (None,)]:
        assert busy.admit("b", limits, *call) == fresh.admit("b", limits, *call)


# ---- persistence -----------------------------------------------------------------------------------------------


def test_snapshot_restores_the_same_decisions() -> None:
    clock = Clock(NOON)
    s = state(clock)
    limits = TenantLimits(requests_per_minute=6, burst=2, max_concurrent_jobs=2, daily_gpu_seconds=100)
    s.admit("acme", limits, "j1", estimated_gpu_s=30)
    s.charge_gpu_seconds("acme", 50)
    snap = json.loads(json.dumps(s.snapshot()))  # survives JSON
    restored = state(clock)
    restored.restore(snap)
    assert restored.active_jobs("acme") == {"j1"} and restored.gpu_seconds_used("acme") == 50
    for call in [("j2",), ("j3",), (None,)]:
        assert restored.admit("acme", limits, *call, estimated_gpu_s=10) == s.admit("acme", limits, *call,
                                                                                   estimated_gpu_s=10)
    with pytest.raises(ValueError):
        restored.restore({"version": 99})


def test_reconcile_rebuilds_from_s3_but_keeps_just_admitted_jobs() -> None:
    clock = Clock(NOON)
    s = state(clock, reconcile_grace_s=60)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=3, daily_gpu_seconds=100)
    assert not s.reconciled
    s.admit("a", limits, "old-gone")  # ended, but its release never arrived
    s.admit("a", limits, "j1")
    clock.advance(120)
    s.admit("a", limits, "just-admitted")  # record not written yet: S3 cannot show it
    s.charge_gpu_seconds("a", 30)
    s.reconcile({"a": {"j1", "j9"}, "b": {"j2"}}, {("a", "2025-06-15"): 20.0, ("b", "2025-06-15"): 99.0})
    assert s.reconciled
    assert s.active_jobs("a") == {"j1", "j9", "just-admitted"} and s.active_jobs("b") == {"j2"}
    assert s.gpu_seconds_used("a") == 30 and s.gpu_seconds_used("b") == 99  # usage never shrinks
    refused(s.admit("a", limits, "j10"), 429, "concurrency_limited")


def test_reconcile_does_not_bring_back_a_job_released_while_s3_was_read() -> None:
    clock = Clock(NOON)
    s = state(clock, reconcile_grace_s=0)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=1)
    s.admit("a", limits, "j1")
    clock.advance(10)
    scan_started = clock()
    clock.advance(2)
    s.release("a", "j1")  # finished after the scan listed it as active
    clock.advance(2)
    s.reconcile({"a": ["j1"]}, {}, as_of=scan_started)
    assert s.active_jobs("a") == set()
    # a release from before the scan began does not hide a job S3 still shows active
    s.reconcile({"a": ["j1"]}, {}, as_of=clock())
    assert s.active_jobs("a") == {"j1"}


def test_limits_come_from_a_plan() -> None:
    plan = SimpleNamespace(requests_per_minute=30, burst=10, max_concurrent_jobs=4, daily_gpu_seconds=3600,
                           max_cost=1, max_steps=50)
    assert TenantLimits.from_plan(plan) == TenantLimits(requests_per_minute=30, burst=10, max_concurrent_jobs=4,
                                                        daily_gpu_seconds=3600)


def test_a_restarted_limiter_enforces_limits_after_reconcile() -> None:
    clock = Clock(NOON)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=1, daily_gpu_seconds=100)
    restarted = state(clock)
    restarted.reconcile({"a": ["j1"]}, {("b", utc_day(clock())): 100.0})
    refused(restarted.admit("a", limits, "j2"), 429, "concurrency_limited")
    refused(restarted.admit("b", limits, "j3"), 429, "quota_exceeded")
    assert restarted.admit("c", limits, "j4").allowed


def test_disabled_limits_admit_everything() -> None:
    s = LimiterState(LimitsConfig(enabled=False, max_outstanding_jobs=1), Clock(NOON))
    limits = TenantLimits(requests_per_minute=1, burst=1, max_concurrent_jobs=1)
    assert all(s.admit("a", limits, f"j{i}").allowed for i in range(5))


def test_a_refusal_becomes_the_api_error_with_its_headers() -> None:
    s = state(Clock(NOON))
    limits = TenantLimits(requests_per_minute=60, burst=1)
    s.admit("a", limits)
    err = s.admit("a", limits).as_error()
    assert isinstance(err, ServiceError)
    assert (err.status, err.code) == (429, "rate_limited")
    assert err.headers["Retry-After"] == "1" and err.headers["X-RateLimit-Remaining"] == "0"


# ---- fair queue ------------------------------------------------------------------------------------------------


def test_one_job_of_a_tenant_is_not_queued_behind_anothers_fifty() -> None:
    q = FairQueue()
    for i in range(50):
        q.push("bulk", f"bulk-{i}")
    q.push("single", "single-0")
    order = [q.pop() for _ in range(51)]
    assert order == ["bulk-0", "single-0"] + [f"bulk-{i}" for i in range(1, 50)]
    assert q.pop() is None and len(q) == 0


def test_fair_queue_round_robin_weights_and_removal() -> None:
    q = FairQueue(weight=lambda t: 2 if t == "gold" else 1)
    for i in range(4):
        q.push("gold", f"g{i}")
        q.push("free", f"f{i}")
    assert q.push("gold", "g0") is False  # already waiting
    assert "g3" in q and q.waiting("gold") == 4
    assert q.remove("f1") and not q.remove("f1")
    order = [q.pop() for _ in range(len(q))]
    assert order == ["g0", "g1", "f0", "g2", "g3", "f2", "f3"]
    # a tenant removed while at the head of the rotation does not leave a stale turn behind
    q.push("a", "a0")
    q.push("b", "b0")
    q.remove("a0")
    assert [q.pop(), q.pop()] == ["b0", None]


# ---- async interface -------------------------------------------------------------------------------------------


def test_local_limiter_offers_the_async_interface() -> None:
    async def main() -> None:
        clock = Clock(NOON)
        lim = LocalLimiter(LimitsConfig(max_outstanding_jobs=None), clock)
        limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=1, daily_gpu_seconds=10)
        assert await lim.needs_reconcile()
        assert (await lim.admit("a", limits, "j1")).allowed
        refused(await lim.admit("a", limits, "j2"), 429, "concurrency_limited")
        assert await lim.release("a", "j1")
        assert await lim.charge_gpu_seconds("a", 10) == 10
        refused(await lim.admit("a", limits, "j2"), 429, "quota_exceeded")
        await lim.reconcile({"b": ["j7"]}, {})
        assert not await lim.needs_reconcile()
        snap = await lim.snapshot()
        assert snap["active"] == {"b": {"j7": [clock(), 0.0]}}
        await lim.configure(LimitsConfig(enabled=False))
        assert (await lim.admit("a", limits, "j2")).allowed

    asyncio.run(main())
