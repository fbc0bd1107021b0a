"""BacklogPolicy: the autoscaling policy of a model's stage deployments that counts the jobs queued for the model.

Serve's own policy sizes a deployment by the requests at its replicas. The jobs an ingress holds back in its fair
queue have sent no request yet, so a deep backlog never asks for more replicas than the chains in flight do. This
policy reads the model's demand (queued + running jobs, summed over the ingress replicas' reports, see
serve/jobs/demand.py) from the shared limiter actor, the one place every deployment's policy can reach (a
per-deployment policy sees only its own deployment's metrics; with scale-to-zero no stage replica is left to report
anything). It asks for

    max(Serve's own request-based desire, ceil(jobs / target_ongoing_requests))

replicas, so `target_ongoing_requests` reads as "jobs of the model's backlog one replica of this stage is sized
for": 1 for the Denoiser (a job holds it for the whole loop), more for the quick stages. Serve's wrapper then
applies min/max_replicas, the up/downscale delays and the scaling factors, as for its own policy. Without a fresh
demand (the actor unreachable, no ingress reporting) the policy is Serve's own.

Tunables stay out of the policy's kwargs (a policy is part of the application's code version: changing it restarts
every replica): what it reads is the deployment's `autoscaling_config` (a lightweight update) and the ingress's
reports. Its only kwargs name the limiter actor.

It runs in Serve's controller, on every control-loop tick: it never blocks there. A read of the actor is started
and picked up on a later tick when it has answered (`ray.wait(timeout=0)`); its value counts for `stale_s`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ray.serve")

MODEL_APP_PREFIX = "model-"  # serve.config.app.model_app_name: a model's application is `model-<name>`
DEFAULT_LIMITER = ("videogen-limiter", "videogen")  # serve.config.limits.LimitsConfig's actor_name/_namespace
REFRESH_S = 0.5  # how often the demand is read again
STALE_S = 10.0  # a demand read longer ago than this is not used


def model_of(app_name: str | None) -> str | None:
    if not app_name or not app_name.startswith(MODEL_APP_PREFIX):
        return None
    return app_name[len(MODEL_APP_PREFIX):]


def backlog_replicas(jobs: int, per_replica: float) -> int:
    """Replicas for `jobs` of demand at `per_replica` jobs each (before Serve's bounds)."""
    return math.ceil(jobs / per_replica - 1e-9) if jobs > 0 else 0


class BacklogPolicy:
    """`autoscaling_config.policy.policy_function: deployments.autoscaling:BacklogPolicy` (a class: Serve builds
    one per deployment and calls it every tick). `source` replaces the actor read in unit tests."""

    def __init__(self, limiter_name: str = DEFAULT_LIMITER[0], limiter_namespace: str = DEFAULT_LIMITER[1],
                 source: Callable[[str], dict[str, int] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._name = limiter_name
        self._namespace = limiter_namespace
        self._source = source
        self._clock = clock
        self._actor: Any = None
        self._pending: Any = None  # an ObjectRef of a demand read in flight
        self._asked = -math.inf
        self._value: dict[str, int] | None = None
        self._value_at = -math.inf

    def __call__(self, ctx: Any) -> tuple[int | float, dict[str, Any]]:
        from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

        own, _ = replica_queue_length_autoscaling_policy(ctx)
        model = model_of(ctx.app_name)
        demand = self._demand(model) if model is not None else None
        if demand is None:
            return own, {}
        wanted = min(backlog_replicas(int(demand.get("queued", 0)) + int(demand.get("running", 0)),
                                      ctx.config.get_target_ongoing_requests()),
                     ctx.capacity_adjusted_max_replicas)  # Serve bounds it too; asking beyond is noise
        return max(own, wanted), {"backlog_jobs": demand.get("queued", 0) + demand.get("running", 0),
                                  "backlog_replicas": wanted}

    # -- the demand, read without blocking the controller ----------------------------------------------------
    def _demand(self, model: str) -> dict[str, int] | None:
        now = self._clock()
        if self._source is not None:
            return self._source(model)
        self._collect(now)
        if self._pending is None and now - self._asked >= REFRESH_S:
            self._asked = now
            try:
                if self._actor is None:
                    import ray

                    self._actor = ray.get_actor(self._name, namespace=self._namespace)
                self._pending = self._actor.demand.remote(model)
            except Exception:  # noqa: BLE001 - no limiter (yet): Serve's own policy meanwhile
                self._actor = None
        if self._value is None or now - self._value_at > STALE_S:
            return None
        if not self._value.get("reporters"):
            return None  # nobody reports: no ingress (yet), or all of them stopped
        return self._value

    def _collect(self, now: float) -> None:
        if self._pending is None:
            return
        import ray

        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            if now - self._asked > STALE_S:  # an answer that never came: ask again
                self._pending = None
                self._actor = None
            return
        ref, self._pending = self._pending, None
        try:
            self._value = ray.get(ref)
            self._value_at = now
        except Exception:  # noqa: BLE001 - the actor restarted or is gone: look it up again next time
            self._actor = None
