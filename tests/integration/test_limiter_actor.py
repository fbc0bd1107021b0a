"""The shared limiter actor on the session's Ray cluster: handles obtained separately (and from another process)
see one state, and a restarted actor is rebuilt by `reconcile`."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from serve.config.limits import LimitsConfig, TenantLimits

pytestmark = pytest.mark.integration

NAMESPACE = "videogen-test"


def test_handles_obtained_separately_share_one_state(cluster) -> None:
    import ray

    from deployments.limiter import RayLimiter, get_or_create_limiter

    name = f"limiter-{uuid.uuid4().hex[:8]}"
    cfg = LimitsConfig(actor_name=name, actor_namespace=NAMESPACE, max_outstanding_jobs=None, call_timeout_s=60)
    limits = TenantLimits(requests_per_minute=None, max_concurrent_jobs=1)
    first = RayLimiter.connect(cfg)  # as one ingress replica would
    second = RayLimiter(get_or_create_limiter(name, NAMESPACE), timeout_s=60)  # as another would

    @ray.remote(num_cpus=0)
    def active_seen_from_another_process(actor_name: str, namespace: str) -> dict:
        from deployments.limiter import RayLimiter as Remote
        from deployments.limiter import get_or_create_limiter as get

        return asyncio.run(Remote(get(actor_name, namespace), 60).snapshot())["active"]

    async def shared() -> None:
        assert (await first.admit("acme", limits, "j1")).allowed
        refused = await second.admit("acme", limits, "j2")
        assert (refused.allowed, refused.status, refused.code) == (False, 429, "concurrency_limited")
        assert (await second.admit("globex", limits, "g1")).allowed  # another tenant is unaffected
        assert await second.release("acme", "j1")
        assert (await first.admit("acme", limits, "j2")).allowed

    try:
        asyncio.run(shared())
        seen = ray.get(active_seen_from_another_process.remote(name, NAMESPACE), timeout=120)
        assert {t: set(jobs) for t, jobs in seen.items()} == {"acme": {"j2"}, "globex": {"g1"}}

        # a crash loses the in-memory state; Ray restarts the actor and the caller rebuilds it from S3's view
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)

        async def restarted() -> None:
            # ray.kill is asynchronous: calls right after it may still reach the old actor, and calls made
            # while the new one starts may fail. Poll until the restarted actor (empty state) answers.
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await first.snapshot())["active"] == {}:
                        break
                except Exception:  # noqa: BLE001
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("the limiter actor did not come back empty within 60 s of its crash")
                await asyncio.sleep(0.2)
            assert await first.needs_reconcile(), "a restarted limiter must ask to be reconciled"
            await second.reconcile({"acme": ["j2"], "globex": ["g1"]}, {})
            assert not await first.needs_reconcile()
            again = await first.admit("acme", limits, "j3")
            assert (again.allowed, again.code) == (False, "concurrency_limited")

        asyncio.run(restarted())
    finally:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
