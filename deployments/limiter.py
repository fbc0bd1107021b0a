"""The shared limiter: one named, detached Ray actor holding `serve.admission.limits.LimiterState` for every ingress replica.

Limits must hold across ingress replicas, so the counters cannot live in a replica. Each replica gets a handle with
`RayLimiter.connect(config)` (get-or-create by name) and calls the same async methods as `serve.admission.limits.LocalLimiter`.
The actor is an asyncio actor: its methods do not await, so each runs to the end before the next starts (no locks).

Restarts: `max_restarts=-1` brings a dead actor back, empty. Its `needs_reconcile()` is then True, and an ingress
rebuilds it from S3 (active markers + job records -> tenant's active jobs; usage records -> GPU-seconds per day) with
`reconcile`. Rate buckets start full again; that is the only state not rebuilt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from serve.admission.limits import Decision, LimiterUnavailable, LocalLimiter
from serve.config.limits import LimitsConfig, TenantLimits


class LimiterActor(LocalLimiter):
    """The actor body: `serve.admission.limits.LocalLimiter` (all logic is in `LimiterState`), run as one named Ray actor."""


def get_or_create_limiter(name: str, namespace: str, config: LimitsConfig | None = None) -> Any:
    """The handle of the limiter actor `namespace/name`, created if nobody has yet (Ray resolves creation races).

    An existing actor keeps its state; it is not reconfigured here (`RayLimiter.connect` does that).
    """
    cls = ray.remote(LimiterActor)
    return cls.options(
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=-1, max_task_retries=2,
        # on the head: it outlives worker pods that the autoscaler removes (the head runs no replicas)
        resources={"node:__internal_head__": 0.001},
    ).remote(config or LimitsConfig())


class RayLimiter:
    """`serve.admission.limits.Limiter` over the actor handle; every call bounded by `timeout_s`."""

    def __init__(self, handle: Any, timeout_s: float = 2.0) -> None:
        self._handle = handle
        self._timeout_s = timeout_s

    @classmethod
    def connect(cls, config: LimitsConfig) -> RayLimiter:
        handle = get_or_create_limiter(config.actor_name, config.actor_namespace, config)
        handle.configure.remote(config)  # a redeploy's new settings reach an actor that outlived the old app
        return cls(handle, config.call_timeout_s)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        ref = getattr(self._handle, method).remote(*args, **kwargs)
        try:
            return await asyncio.wait_for(ref, self._timeout_s)
        except (asyncio.TimeoutError, GetTimeoutError, RayActorError) as exc:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - the actor may be gone; the call is abandoned either way
                pass
            raise LimiterUnavailable(f"limiter {method} failed: {type(exc).__name__}") from exc

    async def configure(self, config: LimitsConfig) -> None:
        await self._call("configure", config)

    async def admit(self, tenant: str, limits: TenantLimits, job_id: str | None = None, *,
                    estimated_gpu_s: float = 0.0, charge_rate: bool = True) -> Decision:
        return await self._call("admit", tenant, limits, job_id, estimated_gpu_s=estimated_gpu_s,
                                charge_rate=charge_rate)

    async def release(self, tenant: str, job_id: str) -> bool:
        return await self._call("release", tenant, job_id)

    async def charge_gpu_seconds(self, tenant: str, seconds: float, day: str | None = None) -> float:
        return await self._call("charge_gpu_seconds", tenant, seconds, day)

    async def reconcile(self, active_jobs: Mapping[str, Iterable[str]],
                        usage: Mapping[tuple[str, str], float], as_of: float | None = None) -> None:
        await self._call("reconcile", {t: list(ids) for t, ids in active_jobs.items()}, dict(usage), as_of)

    async def needs_reconcile(self) -> bool:
        return await self._call("needs_reconcile")

    async def snapshot(self) -> dict[str, Any]:
        return await self._call("snapshot")

    async def report_demand(self, owner: str, counts: Mapping[str, tuple[int, int]], stale_s: float) -> None:
        await self._call("report_demand", owner, {m: list(c) for m, c in counts.items()}, stale_s)

    async def forget_demand(self, owner: str) -> None:
        await self._call("forget_demand", owner)

    async def demand(self, model: str) -> dict[str, int]:
        return await self._call("demand", model)
