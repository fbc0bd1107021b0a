"""Accepted jobs waiting for a pipeline slot on one ingress replica, served fairly across tenants."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# ---- fair dispatch --------------------------------------------------------------------------------------------


class FairQueue:
    """Accepted jobs waiting for a pipeline slot: a FIFO per tenant, served by (weighted) round robin.

    With weights 1 every tenant with waiting jobs gets one slot per round, so a tenant's single job waits for at most
    one job of each other tenant, however many they queued. `weight(tenant)` lets a plan take several per round.
    """

    def __init__(self, weight: Callable[[str], int] | None = None) -> None:
        self._weight = weight or (lambda _t: 1)
        self._queues: dict[str, deque[str]] = {}
        self._rotation: deque[str] = deque()  # tenants with waiting jobs, next to serve first
        self._credit = 0  # pops left for the tenant at the head of the rotation in this round
        self._tenant_of: dict[str, str] = {}

    def push(self, tenant: str, job_id: str) -> bool:
        """Queue a job; False if it is already queued."""
        if job_id in self._tenant_of:
            return False
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._rotation.append(tenant)
        q.append(job_id)
        self._tenant_of[job_id] = tenant
        return True

    def pop(self) -> str | None:
        """The next job to run, or None if nothing waits."""
        if not self._rotation:
            return None
        tenant = self._rotation[0]
        if self._credit <= 0:
            self._credit = max(1, int(self._weight(tenant)))
        q = self._queues[tenant]
        job_id = q.popleft()
        del self._tenant_of[job_id]
        self._credit -= 1
        if not q:
            del self._queues[tenant]
            self._rotation.popleft()
            self._credit = 0
        elif self._credit <= 0:
            self._rotation.rotate(-1)
        return job_id

    def remove(self, job_id: str) -> bool:
        """Drop a waiting job (cancelled or deleted before it started); False if it was not waiting."""
        tenant = self._tenant_of.pop(job_id, None)
        if tenant is None:
            return False
        q = self._queues[tenant]
        q.remove(job_id)
        if not q:
            del self._queues[tenant]
            if self._rotation[0] == tenant:
                self._credit = 0
            self._rotation.remove(tenant)
        return True

    def __len__(self) -> int:
        return len(self._tenant_of)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tenant_of

    def waiting(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))
