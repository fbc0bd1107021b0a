"""Everything a `POST /v1/videos` passes before a job exists.

Order (cheapest refusal first): plan and cost ceiling -> one limiter round trip: rate, concurrency, daily GPU
quota, service overload (429/503), which reserves the job's slot -> prompt policy (400/503) -> webhook URL (400) ->
idempotency claim (a replay returns the first job) -> job record. A refusal after the limiter gives the slot back
(a second round trip, on that path only): admission costs one round trip to the shared limiter actor, not two.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from serve.admission.idempotency import (
    Claim,
    IdempotencyStore,
    body_hash,
    canonical_body,
    validate_key,
)
from serve.admission.limits import Limiter, LimiterUnavailable, unavailable_error
from serve.admission.safety import PromptPolicy, enforce
from serve.api.wire import CreateVideoRequest
from serve.config import AppConfig
from serve.config.limits import TenantLimits
from serve.config.tenancy import Plan
from serve.errors import ServiceError
from serve.jobs.record import JobRecord
from serve.jobs.store import JobStore
from serve.stages.types import GenerationParams
from serve.tenancy.keys import Principal
from serve.tenancy.plans import check_cost, resolve_plan
from serve.webhooks.events import Notifier

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A request that may become job `job_id` (or a replay of an earlier one: `replay` is its record)."""

    job_id: str
    limits: TenantLimits
    headers: dict[str, str]
    claim: Claim | None = None
    key: str | None = None
    replay: JobRecord | None = None


class Admission:
    def __init__(self, config: AppConfig, store: JobStore, limiter: Limiter, policy: PromptPolicy,
                 idempotency: IdempotencyStore, webhooks: Notifier | None) -> None:
        self._config = config
        self._store = store
        self._limiter = limiter
        self._policy = policy
        self._idem = idempotency
        self._webhooks = webhooks

    async def _admit(self, tenant: str, limits: TenantLimits, job_id: str | None = None, **kw: Any):
        try:
            decision = await self._limiter.admit(tenant, limits, job_id, **kw)
        except LimiterUnavailable:
            raise unavailable_error() from None
        if not decision.allowed:
            raise decision.as_error()
        return decision

    def check_plan(self, params: GenerationParams, principal: Principal) -> Plan:
        """The caller's plan, if it allows what `params` ask (the inputs, steps and cost): the first gate, also
        run on its own before an input image is read."""
        plan = resolve_plan(self._config.plans, principal.plan)
        check_cost(plan, params, plan_name=principal.plan)
        return plan

    async def check(self, req: CreateVideoRequest, params: GenerationParams, principal: Principal,
                    job_id: str, idempotency_key: str | None, *, fingerprint: dict[str, Any] | None = None) -> Admitted:
        """Run the gates in order; raises the first refusal as an `ServiceError`. `fingerprint` replaces fields of
        `req` in the idempotency fingerprint (an input image by its hash)."""
        plan = self.check_plan(params, principal)
        limits = TenantLimits.from_plan(plan)
        # rate and the job's slot at once (the rate token stays charged when the slot is refused)
        try:
            decision = await self._admit(principal.tenant, limits, job_id)
        except ServiceError as exc:
            # an idempotent retry of a job that holds the tenant's last slot is answered with that job, not a 429
            if idempotency_key is None or exc.code == "rate_limited":
                raise
            replay = await self._replay_only(req, principal, idempotency_key, job_id, fingerprint, limits)
            if replay is None:
                raise
            return replay
        admitted = Admitted(job_id=job_id, limits=limits, headers=dict(decision.headers))
        try:
            await asyncio.to_thread(enforce, self._policy, req.prompt, req.negative_prompt)
            if req.webhook_url is not None:
                if self._webhooks is None:
                    raise ServiceError(400, "webhooks are not enabled on this deployment", param="webhook_url",
                                       code="webhooks_disabled")
                await self._webhooks.validate_registration(req.webhook_url, principal.tenant)
            if idempotency_key is not None:
                admitted.key = validate_key(idempotency_key)
                res = await self._resolve(principal.tenant, admitted.key, req, fingerprint, job_id)
                if res.outcome == "replay":  # the first request's job holds its own slot: ours goes back
                    await self.release(principal.tenant, job_id)
                    admitted.replay = res.job
                    return admitted
                admitted.claim = res.claim
                if res.claim.job_id != job_id:  # took over an abandoned claim: the slot moves to its job id
                    await self.release(principal.tenant, job_id)
                    admitted.job_id = res.claim.job_id
                    await self._admit(principal.tenant, limits, admitted.job_id, charge_rate=False)
        except BaseException:
            await self.release(principal.tenant, admitted.job_id)
            await self._abandon(principal.tenant, admitted)
            raise
        if admitted.claim is not None and admitted.key is not None:
            if await asyncio.to_thread(self._idem.confirm, principal.tenant, admitted.key, admitted.claim) is None:
                # our claim was taken over while we stalled: the other request creates the job
                await self.release(principal.tenant, admitted.job_id)
                raise ServiceError(409, "a request with this Idempotency-Key is still being processed; retry shortly",
                               param="Idempotency-Key", code="idempotency_key_in_use", headers={"Retry-After": "1"})
        return admitted

    async def _resolve(self, tenant: str, key: str, req: CreateVideoRequest, fingerprint: dict[str, Any] | None,
                       job_id: str):
        body = body_hash(canonical_body({**req.model_dump(exclude_none=True), **(fingerprint or {})}))
        return await self._idem.resolve(tenant, key, body, job_id, self._store.get,
                                        wait_s=self._config.idempotency.replay_wait_s,
                                        poll_s=self._config.idempotency.poll_s)

    async def _replay_only(self, req: CreateVideoRequest, principal: Principal, idempotency_key: str, job_id: str,
                           fingerprint: dict[str, Any] | None, limits: TenantLimits) -> Admitted | None:
        """The first job of an idempotent request refused a slot, if it is a replay; else None (and no claim)."""
        key = validate_key(idempotency_key)
        res = await self._resolve(principal.tenant, key, req, fingerprint, job_id)
        if res.outcome == "replay":
            return Admitted(job_id=res.job.id, limits=limits, headers={}, key=key, replay=res.job)
        await asyncio.to_thread(self._idem.abandon, principal.tenant, key, res.claim)
        return None

    async def _abandon(self, tenant: str, admitted: Admitted) -> None:
        if admitted.claim is not None and admitted.key is not None:
            await asyncio.to_thread(self._idem.abandon, tenant, admitted.key, admitted.claim)

    async def failed_to_create(self, tenant: str, admitted: Admitted) -> None:
        """The job record could not be written: give back what `check` reserved."""
        await self.release(tenant, admitted.job_id)
        await self._abandon(tenant, admitted)

    async def release(self, tenant: str, job_id: str) -> None:
        try:
            await self._limiter.release(tenant, job_id)
        except LimiterUnavailable:
            log.warning("limiter unavailable: job %s released at the next reconcile", job_id)


