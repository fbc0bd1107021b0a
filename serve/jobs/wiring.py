"""The ingress's object graph, built in one place from config and the pieces that differ per environment.

`deployments/ingress.py` passes the Ray pieces (the stage chain, the cluster-wide limiter actor, metrics
events, the webhook sender); unit tests pass fakes and get the same graph production runs. Nothing is set on
an object after it is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.admission.gate import Admission
from serve.admission.idempotency import IdempotencyStore
from serve.admission.limits import Limiter, LocalLimiter
from serve.admission.safety import PromptPolicy
from serve.billing.usage import UsageLedger
from serve.config import AppConfig
from serve.jobs.hooks import JobEnd
from serve.jobs.runner import JobEvents, JobRunner, Pipeline
from serve.jobs.service import VideoService
from serve.jobs.store import JobStore
from serve.jobs.view import VideoView
from serve.storage import Storage
from serve.webhooks.events import Notifier


@dataclass(frozen=True)
class IngressGraph:
    store: JobStore
    limiter: Limiter
    ledger: UsageLedger
    policy: PromptPolicy
    runner: JobRunner
    service: VideoService


def build_ingress(config: AppConfig, *, storage: Storage, pipeline: Pipeline, owner: str,
                  limiter: Limiter | None = None, webhooks: Notifier | None = None, events: JobEvents | None = None,
                  clock: Callable[[], float] = time.time) -> IngressGraph:
    """Everything one ingress replica runs; `limiter` defaults to an in-process one (one replica)."""
    store = JobStore.from_config(storage, config.jobs)
    limiter = limiter if limiter is not None else LocalLimiter(config.limits)
    ledger = UsageLedger(storage, config.usage.read_concurrency)
    policy = PromptPolicy(config.safety)
    view = VideoView(config, storage, clock)
    admission = Admission(config, store, limiter, policy, IdempotencyStore.from_config(storage, config.idempotency),
                          webhooks)
    runner = JobRunner(store, pipeline, config.jobs, owner, events=events,
                       on_finished=JobEnd(config, limiter, ledger, webhooks, view))
    service = VideoService(config, store, storage, runner, admission, ledger, view, clock)
    return IngressGraph(store=store, limiter=limiter, ledger=ledger, policy=policy, runner=runner, service=service)
