"""The cluster's demand per model: the jobs waiting for a model's stages, as every ingress replica reports them.

Why here: the jobs queued behind an ingress's in-flight cap are invisible to Serve (they have sent no request to
any stage handle yet), so Serve's own autoscaling, which counts the requests at a deployment's replicas, never
asks for more replicas than the in-flight chains need. Each ingress replica reports its per-model counts (queued:
accepted, waiting for a chain slot; running: chain in flight) to the shared limiter actor every
`jobs.demand_report_interval_s`; the stage deployments' autoscaling policy (deployments/autoscaling.py) reads
the sum there. A replica that stopped reporting (it died) drops out after `stale_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """One model's jobs across the ingress replicas that reported recently."""

    queued: int = 0
    running: int = 0
    reporters: int = 0  # ingress replicas whose report is fresh

    @property
    def jobs(self) -> int:
        """Jobs that need the model's stages now or soon: what the stage replicas are sized for."""
        return self.queued + self.running

    def as_dict(self) -> dict[str, int]:
        return {"queued": self.queued, "running": self.running, "reporters": self.reporters}


class DemandBoard:
    """The latest report of each ingress replica (owner -> model -> (queued, running)), summed per model."""

    def __init__(self, stale_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self.stale_s = stale_s
        self._clock = clock
        self._reports: dict[str, tuple[float, dict[str, tuple[int, int]]]] = {}

    def report(self, owner: str, counts: Mapping[str, tuple[int, int] | list[int]], stale_s: float | None = None) -> None:
        """Replace `owner`'s report; `stale_s` (the reporter's interval x 3) says when it stops counting."""
        if stale_s is not None:
            self.stale_s = stale_s
        self._reports[owner] = (self._clock(), {m: (int(c[0]), int(c[1])) for m, c in counts.items()})

    def forget(self, owner: str) -> None:
        """`owner` stopped (shutdown): its jobs are handed back, not its demand any more."""
        self._reports.pop(owner, None)

    def _fresh(self) -> list[dict[str, tuple[int, int]]]:
        now = self._clock()
        for owner in [o for o, (at, _) in self._reports.items() if now - at > self.stale_s]:
            del self._reports[owner]
        return [counts for _, counts in self._reports.values()]

    def demand(self, model: str) -> Demand:
        fresh = self._fresh()
        queued = sum(c.get(model, (0, 0))[0] for c in fresh)
        running = sum(c.get(model, (0, 0))[1] for c in fresh)
        return Demand(queued=queued, running=running, reporters=len(fresh))
