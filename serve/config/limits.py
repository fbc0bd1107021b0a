"""`limits:` config section and a tenant's four limits (a leaf: plans fill `TenantLimits` in)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# ---- config ---------------------------------------------------------------------------------------------------


class TenantLimits(BaseModel):
    """A tenant's limits (plans fill these in). `None` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: float | None = Field(
        default=60.0, gt=0, description="Sustained request rate; the bucket refills at this rate.")
    burst: int | None = Field(
        default=None, ge=1, description="Requests allowed at once from a full bucket; default: one minute's worth.")
    max_concurrent_jobs: int | None = Field(default=4, ge=1, description="Queued + running jobs at once.")
    daily_gpu_seconds: float | None = Field(
        default=None, gt=0, description="GPU-seconds a tenant may use per UTC day.")

    @classmethod
    def from_plan(cls, plan: Any) -> TenantLimits:
        """The four limits of any object that has them as attributes (e.g. `serve.tenancy.plans.Plan`)."""
        return cls(requests_per_minute=plan.requests_per_minute, burst=plan.burst,
                   max_concurrent_jobs=plan.max_concurrent_jobs, daily_gpu_seconds=plan.daily_gpu_seconds)

    @property
    def bucket_size(self) -> int | None:
        if self.requests_per_minute is None:
            return None
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_minute))


class LimitsConfig(BaseModel):
    """Service-wide limits and the shared limiter's settings (tenant plans give the per-tenant numbers)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Off: every request is admitted (local runs, benchmarks).")
    default: TenantLimits = Field(default_factory=TenantLimits, description="Limits of a tenant without a plan.")
    max_outstanding_jobs: int | None = Field(
        default=256, ge=1, description="Queued + running jobs of all tenants above which POST gets 503.")
    fair_share_above: float = Field(
        default=0.8, gt=0, le=1,
        description="Above this fraction of max_outstanding_jobs a tenant holding at least an equal share of it "
                    "(among the tenants with jobs plus one newcomer) gets 503: a tenant alone stops here, so one "
                    "tenant's burst cannot fill the service.")
    overload_retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 503 `overloaded`.")
    concurrency_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After of a 429 `concurrency_limited` (when a running job may end).")
    reconcile_grace_s: float = Field(
        default=60.0, ge=0,
        description="`reconcile` keeps jobs admitted this recently even if S3 does not show them yet "
                    "(admitted, record not yet written).")
    reconcile_interval_s: float = Field(
        default=300.0, gt=0, description="How often an ingress rebuilds the shared state from S3 (drift repair).")
    actor_name: str = Field(default="videogen-limiter", description="Name of the shared limiter actor.")
    actor_namespace: str = Field(default="videogen", description="Ray namespace of the limiter actor.")
    call_timeout_s: float = Field(
        default=2.0, gt=0, description="Longest wait for the limiter actor; past it POST answers 503.")


