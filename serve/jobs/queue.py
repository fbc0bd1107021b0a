"""Accepted jobs waiting for a pipeline slot on one ingress replica, served fairly across tenants."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

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


# ---- the cluster's backlog, as the reclaim scan sees it ---------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """Queued jobs cluster-wide, as one replica's last reclaim scan read them (every `reclaim_interval_s`, from
    the records it reads anyway): what a queued job's position and estimated start are computed from.

    Queued jobs wait for a chain slot in a `FairQueue`, served round robin across tenants, so a job's position
    counts its own tenant's older jobs and, per other tenant, the jobs that tenant gets in before it: one per round
    until this job's round, plus one in its round when that tenant's rotation turn comes first (taken here as the
    tenant whose oldest waiting job is older). Each replica has its own queue; this reads them as one.

    `starts_per_s` is how fast jobs left the queue between the last scans (smoothed; a job cancelled while queued
    counts as having left); None until two scans were seen, 0 while nothing moved."""

    at: float
    waiting: tuple[tuple[str, str], ...]  # (job id, tenant) of queued jobs, oldest first (ids sort by creation)
    running: int
    starts_per_s: float | None = None

    @cached_property
    def _by_tenant(self) -> dict[str, list[str]]:
        """Each tenant's queued ids, oldest first: derived once per scan, not per read of a queued job."""
        out: dict[str, list[str]] = {}
        for job_id, tenant in self.waiting:
            out.setdefault(tenant, []).append(job_id)
        return out

    def position(self, job_id: str, tenant: str) -> int:
        """Jobs that should start before `job_id` (0: it is next). A job newer than the scan counts as the
        newest of its tenant."""
        mine = self._by_tenant.get(tenant, [])
        rounds = bisect_left(mine, job_id)  # its tenant's older jobs: it starts in round rounds + 1
        my_first = min(job_id, mine[0]) if mine else job_id
        ahead = rounds
        for other, ids in self._by_tenant.items():
            if other != tenant:
                ahead += min(len(ids), rounds) + (1 if len(ids) > rounds and ids[0] < my_first else 0)
        return ahead

    def estimated_start(self, job_id: str, tenant: str, now: float) -> float | None:
        """When `job_id` should start at the recent pace; None while the pace is unknown or nothing moves."""
        if not self.starts_per_s:
            return None
        return max(now, self.at + (self.position(job_id, tenant) + 1) / self.starts_per_s)

    def after_scan(self, at: float, waiting: list[tuple[str, str]], running: int) -> Backlog:
        """The next scan's backlog: the pace is the jobs that left the queue since this one, per second."""
        now_waiting = tuple(sorted(waiting))
        left = len({j for j, _ in self.waiting} - {j for j, _ in now_waiting})
        pace = left / (at - self.at) if at > self.at else None
        if pace is not None and self.starts_per_s is not None:
            pace = 0.5 * self.starts_per_s + 0.5 * pace
        return Backlog(at=at, waiting=now_waiting, running=running, starts_per_s=pace)
