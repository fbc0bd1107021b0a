"""Everything a `POST /v1/videos` passes before a job exists.

Order (cheapest refusal first, nothing reserved until it cannot be refused for a cheaper reason):
plan and cost ceiling -> rate (429) -> prompt policy (400/503) -> webhook URL (400) -> idempotency claim
(replay returns the first job) -> concurrency, daily GPU quota, service overload (429/503) -> job record.
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
        decision = await self._admit(principal.tenant, limits)  # the rate, charged on every request
        headers = dict(decision.headers)
        await asyncio.to_thread(enforce, self._policy, req.prompt, req.negative_prompt)
        if req.webhook_url is not None:
            if self._webhooks is None:
                raise ServiceError(400, "webhooks are not enabled on this deployment", param="webhook_url",
                               code="webhooks_disabled")
            await self._webhooks.validate_registration(req.webhook_url, principal.tenant)
        admitted = Admitted(job_id=job_id, limits=limits, headers=headers)
        if idempotency_key is not None:
            admitted.key = validate_key(idempotency_key)
            body = body_hash(canonical_body({**req.model_dump(exclude_none=True), **(fingerprint or {})}))
            res = await self._idem.resolve(principal.tenant, admitted.key, body, job_id, self._store.get,
                                           wait_s=self._config.idempotency.replay_wait_s,
                                           poll_s=self._config.idempotency.poll_s)
            if res.outcome == "replay":
                admitted.replay = res.job
                return admitted
            admitted.claim = res.claim
            admitted.job_id = res.claim.job_id
        try:
            await self._admit(principal.tenant, limits, admitted.job_id, charge_rate=False)
        except ServiceError:
            await self._abandon(principal.tenant, admitted)
            raise
        if admitted.claim is not None and admitted.key is not None:
            if await asyncio.to_thread(self._idem.confirm, principal.tenant, admitted.key, admitted.claim) is None:
                # our claim was taken over while we stalled: the other request creates the job
                await self.release(principal.tenant, admitted.job_id)
                raise ServiceError(409, "a request with this Idempotency-Key is still being processed; retry shortly",
                               param="Idempotency-Key", code="idempotency_key_in_use", headers={"Retry-After": "1"})
        return admitted

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


