"""The ingress's object graph, built in one place from config and the pieces that differ per environment.

`deployments/ingress.py` passes the Ray pieces (the stage chain, the cluster-wide limiter actor, metrics
events, the webhook sender); unit tests pass fakes and get the same graph production runs.

Two kinds of objects live here. The long-lived ones hold state that must survive a settings change: the job
store, the runner (its chains in flight, its queue, its leases), the limiter and the webhook sender; a new
config reaches them through their own `configure`. The rest (prompt policy, admission, view, end-of-job
hook, service, keyring) are cheap and hold no state of their own: `reconfigure` builds them anew from the new
config and swaps them in one step, so a request sees either the old settings or the new ones, never a mix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from serve.admission.gate import Admission
from serve.admission.idempotency import IdempotencyStore
from serve.admission.limits import Limiter, LocalLimiter
from serve.admission.safety import PromptPolicy
from serve.billing.usage import UsageLedger
from serve.config import AppConfig
from serve.jobs.hooks import JobEnd
from serve.jobs.record import JobRecord
from serve.jobs.retention import RetentionSweeper
from serve.jobs.runner import JobEvents, JobRunner, Pipeline
from serve.jobs.service import VideoService
from serve.jobs.store import JobStore
from serve.jobs.view import VideoView
from serve.storage import Storage
from serve.tenancy.keys import KeyRing, keyring_from_config
from serve.webhooks.events import Notifier


def build_keyring(config: AppConfig) -> KeyRing:
    """The API keys `config` accepts; ValueError when a key names a plan the config lacks (fail the deploy or
    the reconfigure, not every request of that tenant)."""
    keyring = keyring_from_config(config.keys, [k.get_secret_value() for k in config.api.api_keys])
    missing = keyring.plans_in_use() - set(config.plans.plans)
    if missing:
        raise ValueError(f"API keys use plans missing from `plans`: {sorted(missing)}")
    return keyring


class IngressGraph:
    """Everything one ingress replica runs. `service`, `config` and `keyring` are read per request (the routes
    hold the graph, not its parts), so a `reconfigure` applies to the next request."""

    def __init__(self, config: AppConfig, *, storage: Storage, pipeline: Pipeline, owner: str,
                 limiter: Limiter | None = None, webhooks: Notifier | None = None, events: JobEvents | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._clock = clock
        self.webhooks = webhooks
        self.store = JobStore.from_config(storage, config.jobs)
        # `limiter` defaults to an in-process one (one replica)
        self.limiter = limiter if limiter is not None else LocalLimiter(config.limits)
        self.runner = JobRunner(self.store, pipeline, config.jobs, owner, events=events, on_finished=self._job_ended,
                                on_unbilled=self._bill, on_unnotified=self._redeliver)
        self.sweeper = RetentionSweeper(self.store, storage, self.runner.settle, clock)
        self.policy: PromptPolicy | None = None
        self._build(config)()  # the first settings

    def _build(self, config: AppConfig) -> Callable[[], None]:
        """Build the stateless pieces for `config`, all of them before anything changes (so a config that
        cannot work changes nothing); returns the swap that puts them in force."""
        keyring = build_keyring(config)
        same_policy = self.policy is not None and self.policy.config == config.safety
        policy = self.policy if same_policy else PromptPolicy(config.safety)
        ledger = UsageLedger(self._storage, config.usage.read_concurrency)
        view = VideoView(config, self._storage, self._clock)
        admission = Admission(config, self.store, self.limiter, policy,
                              IdempotencyStore.from_config(self._storage, config.idempotency), self.webhooks)
        end = JobEnd(config, self.limiter, ledger, self.webhooks, view, self.store)
        service = VideoService(config, self.store, self._storage, self.runner, admission, ledger, view, self._clock)

        def swap() -> None:
            old_policy = None if same_policy else self.policy
            # one step: nothing awaits between these assignments
            self.config, self.keyring, self.policy, self.ledger, self._end, self.service = (
                config, keyring, policy, ledger, end, service)
            self.runner.bills_usage = config.usage.enabled
            self.runner.notify_for = end.wants_webhook if self.webhooks is not None else None
            self.runner.notify_claim_s = self.webhooks.claim_s() if self.webhooks is not None else 0.0
            if old_policy is not None:  # admissions under way may still ask its classifier: close it later
                try:
                    asyncio.get_running_loop().call_later(old_policy.config.classifier_timeout_s + 5,
                                                          old_policy.close)
                except RuntimeError:  # no loop (a test building the graph synchronously)
                    old_policy.close()

        return swap


    async def reconfigure(self, config: AppConfig) -> None:
        """Apply new settings to the running graph: no chain is interrupted, no state is lost. Raises (and
        changes nothing) when the new config is unusable, e.g. a key names a missing plan."""
        swap = self._build(config)  # everything new is built before anything is changed
        await self.limiter.configure(config.limits)
        self.store.configure(config.jobs)
        self.runner.configure(config.jobs)
        swap()

    async def _job_ended(self, job: JobRecord) -> None:
        await self._end(job)

    async def _bill(self, job: JobRecord) -> bool:
        return await self._end.bill(job)

    async def _redeliver(self, job: JobRecord) -> None:
        await self._end.redeliver(job)

    def close(self) -> None:
        if self.policy is not None:
            self.policy.close()


def build_ingress(config: AppConfig, *, storage: Storage, pipeline: Pipeline, owner: str,
                  limiter: Limiter | None = None, webhooks: Notifier | None = None, events: JobEvents | None = None,
                  clock: Callable[[], float] = time.time) -> IngressGraph:
    """Everything one ingress replica runs; `limiter` defaults to an in-process one (one replica)."""
    return IngressGraph(config, storage=storage, pipeline=pipeline, owner=owner, limiter=limiter,
                        webhooks=webhooks, events=events, clock=clock)
