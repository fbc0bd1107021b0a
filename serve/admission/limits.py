"""Rate, concurrency, daily GPU quota and service overload: the shared limiter's state and decisions.

One `LimiterState` per cluster (in-process here; a detached Ray actor in deployments/limiter.py, shared by
every ingress replica), rebuilt from S3 after a restart (`serve.admission.reconcile`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Protocol

from serve.config.limits import LimitsConfig, TenantLimits

Code = Literal["rate_limited", "concurrency_limited", "quota_exceeded", "overloaded"]
_EPS = 1e-9
_KEEP_DAYS = 2  # usage of older UTC days is dropped from memory (billing reads the usage records, not this)
_KEEP_RELEASED_S = 3600.0  # how long a release is remembered, so a slower S3 scan cannot bring the job back


# ---- decisions ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The answer to `admit`. Plain fields so it pickles across actors."""

    allowed: bool
    status: int = 200
    code: Code | None = None
    message: str = ""
    retry_after_s: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def as_error(self) -> Exception:
        """The `ServiceError` a route raises for a refusal (imported here lazily: the limiter actor needs no FastAPI)."""
        from serve.errors import ServiceError

        return ServiceError(self.status, self.message, code=self.code, headers=dict(self.headers))


def retry_after(seconds: float) -> int:
    """Whole seconds, at least 1 (`Retry-After` is an integer; 0 invites an instant retry storm)."""
    return max(1, math.ceil(seconds - _EPS))


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def seconds_to_utc_midnight(ts: float) -> float:
    now = datetime.fromtimestamp(ts, tz=timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


@dataclass
class _Active:
    admitted_at: float
    estimated_gpu_s: float = 0.0


# ---- the state ------------------------------------------------------------------------------------------------


class LimiterState:
    """Every tenant's buckets, active jobs and daily usage, plus the service-wide outstanding count.

    Not thread-safe; each method is short and synchronous, so one asyncio loop (an async actor) serialises them.
    """

    def __init__(self, config: LimitsConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config or LimitsConfig()
        self._clock = clock
        self._tat: dict[str, float] = {}  # GCRA theoretical arrival time per tenant
        self._active: dict[str, dict[str, _Active]] = {}
        self._usage: dict[str, dict[str, float]] = {}  # tenant -> UTC day -> GPU-seconds
        self._released: dict[str, float] = {}  # job id -> when it was released (see `reconcile`)
        self.reconciled = False

    def configure(self, config: LimitsConfig) -> None:
        """Apply new settings (a redeploy with another config) without losing the state."""
        self.config = config

    # -- admission ------------------------------------------------------------------------------
    def admit(self, tenant: str, limits: TenantLimits, job_id: str | None = None, now: float | None = None, *,
              estimated_gpu_s: float = 0.0, charge_rate: bool = True) -> Decision:
        """Decide on one request.

        `job_id=None` checks and charges the rate only (any endpoint). With a `job_id` an admitted job also holds a
        concurrency slot and its `estimated_gpu_s` until `release`. A job id already held is admitted again without
        a second reservation (a retried call). `charge_rate=False` skips the rate (already charged for this request).
        """
        now = self._clock() if now is None else now
        cfg = self.config
        if not cfg.enabled:
            return Decision(True)
        held = self._active.get(tenant, {})
        if job_id is not None and job_id in held:
            return Decision(True, headers=self._rate_headers(tenant, limits, now))

        # 1. Rate: a refused request costs no token (else a client retrying too fast would never get through).
        tat_before = self._tat.get(tenant)
        if charge_rate and limits.requests_per_minute is not None:
            wait = self._take_token(tenant, limits, now)
            if wait is not None:
                per = f"{limits.requests_per_minute:g} requests per minute (burst {limits.bucket_size})"
                return self._refuse(429, "rate_limited", f"rate limit of {per} exceeded; retry after "
                                    f"{retry_after(wait)} s", wait, self._rate_headers(tenant, limits, now))
        headers = self._rate_headers(tenant, limits, now)
        if job_id is None:
            return Decision(True, headers=headers)

        # 2. The tenant's own limits (429), before the service's (503): a tenant over its limit should not be told
        #    to retry soon.
        if limits.max_concurrent_jobs is not None and len(held) >= limits.max_concurrent_jobs:
            return self._refuse(429, "concurrency_limited",
                                f"{len(held)} of this tenant's jobs are queued or running, the limit is "
                                f"{limits.max_concurrent_jobs}; retry when one has ended",
                                cfg.concurrency_retry_after_s, headers)
        quota = self._quota_refusal(tenant, limits, now, estimated_gpu_s, headers)
        if quota is not None:
            return quota

        # 3. The service's capacity (503): the rate token goes back, this is not the tenant's doing.
        overload = self._overload_message(tenant)
        if overload is not None:
            if tat_before is None:
                self._tat.pop(tenant, None)
            else:
                self._tat[tenant] = tat_before
            return self._refuse(503, "overloaded", overload, cfg.overload_retry_after_s,
                                self._rate_headers(tenant, limits, now))

        self._active.setdefault(tenant, {})[job_id] = _Active(now, max(0.0, estimated_gpu_s))
        return Decision(True, headers=headers)

    def _take_token(self, tenant: str, limits: TenantLimits, now: float) -> float | None:
        """GCRA: take one token; None if taken, else the seconds until one is available."""
        interval = 60.0 / limits.requests_per_minute  # type: ignore[operator]
        capacity = limits.bucket_size * interval  # type: ignore[operator]
        new_tat = max(self._tat.get(tenant, now), now) + interval
        if new_tat - now > capacity + _EPS:
            return new_tat - capacity - now
        self._tat[tenant] = new_tat
        return None

    def _rate_headers(self, tenant: str, limits: TenantLimits, now: float) -> dict[str, str]:
        if limits.requests_per_minute is None:
            return {}
        interval = 60.0 / limits.requests_per_minute
        size = limits.bucket_size or 1
        backlog = max(self._tat.get(tenant, now) - now, 0.0)  # seconds of tokens in use
        remaining = max(0, math.floor((size * interval - backlog) / interval + _EPS))
        return {
            "X-RateLimit-Limit": str(size),
            "X-RateLimit-Remaining": str(remaining),
            # seconds until the bucket is full again (delta seconds, like IETF RateLimit's `reset`)
            "X-RateLimit-Reset": str(math.ceil(backlog - _EPS)) if backlog > _EPS else "0",
        }

    def _quota_refusal(self, tenant: str, limits: TenantLimits, now: float, estimate: float,
                       headers: dict[str, str]) -> Decision | None:
        if limits.daily_gpu_seconds is None:
            return None
        quota = limits.daily_gpu_seconds
        used = self._usage.get(tenant, {}).get(utc_day(now), 0.0)
        reserved = sum(a.estimated_gpu_s for a in self._active.get(tenant, {}).values())
        if used < quota and used + reserved + estimate <= quota + _EPS:
            return None
        until_midnight = seconds_to_utc_midnight(now)
        if used >= quota - _EPS or used + estimate > quota + _EPS:
            # does not fit even when the running jobs have ended: wait for the next UTC day
            wait = until_midnight
        else:
            wait = min(self.config.concurrency_retry_after_s, until_midnight)
        message = (f"daily GPU quota of {quota:g} GPU-seconds used up ({used:.0f} used, {reserved:.0f} reserved by "
                   f"running jobs); it resets at 00:00 UTC")
        return self._refuse(429, "quota_exceeded", message, wait, headers)

    def _overload_message(self, tenant: str) -> str | None:
        cap = self.config.max_outstanding_jobs
        if cap is None:
            return None
        total = self.outstanding()
        if total >= cap:
            return f"the service is at capacity ({total} jobs queued or running); retry later"
        if total >= self.config.fair_share_above * cap:
            # Share the capacity equally among the tenants with jobs plus one that may still arrive: a tenant alone
            # stops at the watermark, which keeps room for others.
            mine = len(self._active.get(tenant, {}))
            others = sum(1 for t, jobs in self._active.items() if jobs and t != tenant)
            if mine >= cap / (others + 2):
                return (f"the service is nearly at capacity and this tenant holds {mine} of its {total} jobs "
                        f"(more than its share); retry later")
        return None

    @staticmethod
    def _refuse(status: int, code: Code, message: str, wait: float, headers: dict[str, str]) -> Decision:
        secs = retry_after(wait)
        return Decision(False, status, code, message, secs, {**headers, "Retry-After": str(secs)})

    # -- job lifecycle --------------------------------------------------------------------------
    def release(self, tenant: str, job_id: str) -> bool:
        """The job ended (any terminal state) or was never created: free its slot. False if it held none."""
        now = self._clock()
        self._released[job_id] = now
        if len(self._released) > 4096:
            self._released = {j: t for j, t in self._released.items() if now - t < _KEEP_RELEASED_S}
        jobs = self._active.get(tenant)
        if not jobs or jobs.pop(job_id, None) is None:
            return False
        if not jobs:
            del self._active[tenant]
        return True

    def charge_gpu_seconds(self, tenant: str, seconds: float, day: str | None = None) -> float:
        """Add GPU-seconds to the tenant's UTC day (default: today); returns the day's total."""
        day = utc_day(self._clock()) if day is None else day
        days = self._usage.setdefault(tenant, {})
        days[day] = days.get(day, 0.0) + max(0.0, seconds)
        self._prune_days()
        return days[day]

    def _prune_days(self) -> None:
        keep = {utc_day(self._clock() - 86400 * i) for i in range(_KEEP_DAYS)}
        for tenant in list(self._usage):
            days = {d: s for d, s in self._usage[tenant].items() if d in keep}
            if days:
                self._usage[tenant] = days
            else:
                del self._usage[tenant]

    # -- views ----------------------------------------------------------------------------------
    def outstanding(self) -> int:
        return sum(len(jobs) for jobs in self._active.values())

    def active_jobs(self, tenant: str) -> set[str]:
        return set(self._active.get(tenant, {}))

    def gpu_seconds_used(self, tenant: str, day: str | None = None) -> float:
        return self._usage.get(tenant, {}).get(utc_day(self._clock()) if day is None else day, 0.0)

    # -- persistence ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable copy of the state (buckets, active jobs, usage)."""
        now = self._clock()
        return {
            "version": 1,
            "tat": {t: v for t, v in self._tat.items() if v > now},  # a bucket already full is the default
            "active": {t: {j: [a.admitted_at, a.estimated_gpu_s] for j, a in jobs.items()}
                       for t, jobs in self._active.items()},
            "usage": {t: dict(days) for t, days in self._usage.items()},
            "reconciled": self.reconciled,
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        if snap.get("version") != 1:
            raise ValueError(f"unknown limiter snapshot version {snap.get('version')!r}, expected 1")
        self._tat = {t: float(v) for t, v in snap["tat"].items()}
        self._active = {t: {j: _Active(float(a[0]), float(a[1])) for j, a in jobs.items()}
                        for t, jobs in snap["active"].items() if jobs}
        self._usage = {t: {d: float(s) for d, s in days.items()} for t, days in snap["usage"].items()}
        self.reconciled = bool(snap.get("reconciled", False))

    def reconcile(self, active_jobs: Mapping[str, Iterable[str]], usage: Mapping[tuple[str, str], float],
                  now: float | None = None, as_of: float | None = None) -> None:
        """Rebuild from S3: `active_jobs` = tenant -> ids of its non-terminal jobs (active markers + records),
        `usage` = (tenant, UTC day) -> GPU-seconds from usage records; `as_of` = when the caller began reading S3.

        S3 is the truth for active jobs, with two corrections for what happened while it was read: a job released
        since `as_of` stays released, and a job admitted since `as_of - reconcile_grace_s` stays held (its record
        may not have been written yet; the grace also covers clock skew between nodes). Usage only grows: a day
        keeps the larger of the two (a charge may not have reached S3 yet).
        """
        now = self._clock() if now is None else now
        as_of = now if as_of is None else as_of
        keep_since = as_of - self.config.reconcile_grace_s
        rebuilt: dict[str, dict[str, _Active]] = {}
        for tenant, ids in active_jobs.items():
            old = self._active.get(tenant, {})
            jobs = {j: old.get(j, _Active(now)) for j in ids if self._released.get(j, -math.inf) < as_of}
            if jobs:
                rebuilt[tenant] = jobs
        for tenant, jobs in self._active.items():
            for job_id, a in jobs.items():
                if a.admitted_at >= keep_since:
                    rebuilt.setdefault(tenant, {}).setdefault(job_id, a)
        self._released = {j: t for j, t in self._released.items() if now - t < _KEEP_RELEASED_S}
        self._active = rebuilt
        for (tenant, day), seconds in usage.items():
            days = self._usage.setdefault(tenant, {})
            days[day] = max(days.get(day, 0.0), float(seconds))
        self._prune_days()
        self.reconciled = True


# ---- the async interface (in-process here, a Ray actor in deployments/limiter.py) -------------------------------


class LimiterUnavailable(Exception):
    """The shared limiter did not answer in time or is gone: POST answers 503 (see `unavailable_error`)."""


def unavailable_error() -> Exception:
    from serve.errors import ServiceError

    return ServiceError(503, "admission control is unavailable; retry shortly", code="limiter_unavailable",
                    headers={"Retry-After": "1"})


class Limiter(Protocol):
    """What the ingress and the job runner call; `LocalLimiter` and `deployments.limiter.RayLimiter` provide it."""

    async def admit(self, tenant: str, limits: TenantLimits, job_id: str | None = None, *,
                    estimated_gpu_s: float = 0.0, charge_rate: bool = True) -> Decision: ...

    async def release(self, tenant: str, job_id: str) -> bool: ...

    async def charge_gpu_seconds(self, tenant: str, seconds: float, day: str | None = None) -> float: ...

    async def reconcile(self, active_jobs: Mapping[str, Iterable[str]],
                        usage: Mapping[tuple[str, str], float], as_of: float | None = None) -> None: ...

    async def needs_reconcile(self) -> bool: ...

    async def snapshot(self) -> dict[str, Any]: ...

    async def report_demand(self, owner: str, counts: Mapping[str, tuple[int, int]], stale_s: float) -> None:
        """This ingress replica's jobs per model (queued, running), for the stages' autoscaling (serve/jobs/demand.py)."""
        ...


class LocalLimiter:
    """One process's `LimiterState` behind the async `Limiter` interface (unit tests, single-process runs)."""

    def __init__(self, config: LimitsConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        from serve.jobs.demand import DemandBoard

        self.state = LimiterState(config, clock)
        # the cluster's demand per model, beside the limits: the one actor every deployment's policy can reach
        self.demand_board = DemandBoard(clock=clock)

    async def configure(self, config: LimitsConfig) -> None:
        self.state.configure(config)

    async def admit(self, tenant: str, limits: TenantLimits, job_id: str | None = None, *,
                    estimated_gpu_s: float = 0.0, charge_rate: bool = True) -> Decision:
        return self.state.admit(tenant, limits, job_id, estimated_gpu_s=estimated_gpu_s, charge_rate=charge_rate)

    async def release(self, tenant: str, job_id: str) -> bool:
        return self.state.release(tenant, job_id)

    async def charge_gpu_seconds(self, tenant: str, seconds: float, day: str | None = None) -> float:
        return self.state.charge_gpu_seconds(tenant, seconds, day)

    async def reconcile(self, active_jobs: Mapping[str, Iterable[str]],
                        usage: Mapping[tuple[str, str], float], as_of: float | None = None) -> None:
        self.state.reconcile(active_jobs, usage, as_of=as_of)

    async def needs_reconcile(self) -> bool:
        return not self.state.reconciled

    async def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()

    async def report_demand(self, owner: str, counts: Mapping[str, tuple[int, int]], stale_s: float) -> None:
        self.demand_board.report(owner, counts, stale_s)

    async def forget_demand(self, owner: str) -> None:
        self.demand_board.forget(owner)

    async def demand(self, model: str) -> dict[str, int]:
        """What the autoscaling policy reads (a plain dict: the policy runs in Serve's controller)."""
        return self.demand_board.demand(model).as_dict()


