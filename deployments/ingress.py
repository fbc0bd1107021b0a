"""Ingress deployment: the HTTP API (FastAPI) and the job runner that chains the three stage handles.

The chain passes each `DeploymentResponse` straight into the next stage, so embeddings and latents go
replica to replica and only the VAE's small result (object keys) comes back here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import AppConfig
from serve.jobs.record import ChainResult, JobRecord
from serve.jobs.runner import NonRetryableError
from serve.stages.stage import (
    DENOISER,
    STAGES,
    TEXT_ENCODER,
    VAE_DECODER,
    StageError,
    StageRefused,
    StageUnavailable,
    first_failed,
)
from serve.stages.types import GenerationRequest

log = logging.getLogger(__name__)



class RayPipeline:
    """`serve.jobs.runner.Pipeline` over Ray Serve handles."""

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                 vae_decoder: DeploymentHandle) -> None:
        self._te = text_encoder
        self._den = denoiser
        self._vae = vae_decoder

    async def run(self, job: JobRecord) -> ChainResult:
        req = GenerationRequest(job_id=job.id, prompt=job.prompt, negative_prompt=job.params.negative_prompt,
                                params=job.params.sampling, model=job.model, attempt=job.attempts)
        encoded = self._te.encode.remote(req)
        denoised = self._den.denoise.remote(req, encoded)
        result = self._vae.decode.remote(req, denoised)
        try:
            return await result
        except asyncio.CancelledError:
            for response in (encoded, denoised, result):
                response.cancel()
            raise
        except StageRefused as exc:  # the request itself is bad for the model: retrying cannot help
            raise NonRetryableError("invalid_request", exc.message) from None
        except StageError:  # a stage's own failure, typed in its replica (Ray's task error subclasses it)
            raise
        except Exception as exc:  # Ray's own: a replica died or could not be reached; which one?
            try:
                stage = await first_failed([(TEXT_ENCODER, encoded), (DENOISER, denoised), (VAE_DECODER, result)])
            finally:  # an upstream stage may still be computing for this attempt: stop it (also when cancelled)
                for response in (encoded, denoised, result):
                    response.cancel()
            raise StageUnavailable((stage or VAE_DECODER).deployment, type(exc).__name__) from None


class ModelRouter:
    """`Pipeline` that runs a job on the stage chain of the model it names."""

    def __init__(self, pipelines: dict[str, RayPipeline]) -> None:
        self._pipelines = pipelines

    async def run(self, job: JobRecord) -> ChainResult:
        pipeline = self._pipelines.get(job.model)
        if pipeline is None:  # e.g. a job accepted before the model was removed from the config
            raise NonRetryableError("model_not_found", f"model {job.model!r} is no longer served")
        return await pipeline.run(job)


@serve.ingress()
class Ingress:
    async def __init__(self, config: AppConfig, stages: dict[str, list[DeploymentHandle]]) -> None:
        """`stages`: model name -> [TextEncoder, Denoiser, VaeDecoder] handles of that model."""
        from deployments.limiter import RayLimiter
        from deployments.metrics import RayJobEvents, S3Metrics
        from serve.admission.limits import LocalLimiter
        from serve.billing.usage import gpus_per_stage
        from serve.jobs.wiring import build_ingress
        from serve.storage import Storage
        from serve.tenancy.keys import keyring_from_config
        from serve.webhooks.sender import WebhookSender
        from serve.webhooks.signing import WebhookSecrets

        self._config = config
        self._storage = Storage.from_config(config.s3, observer=S3Metrics())
        if config.s3.create_bucket:
            await asyncio.to_thread(self._storage.ensure_bucket)
        # fail the deployment, not every request, on a keys file naming plans the config lacks
        self._keyring = keyring_from_config(config.keys, [k.get_secret_value() for k in config.api.api_keys])
        missing = self._keyring.plans_in_use() - set(config.plans.plans)
        if missing:
            raise ValueError(f"API keys use plans missing from `plans`: {sorted(missing)}")
        self._webhooks = (WebhookSender(config.webhooks, WebhookSecrets.from_config(config.webhooks))
                          if config.webhooks.enabled else None)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests)
            replica = "local"
        graph = build_ingress(
            config, storage=self._storage, owner=f"ingress-{replica}-{uuid.uuid4().hex[:8]}",
            pipeline=ModelRouter({name: RayPipeline(*handles) for name, handles in stages.items()}),
            # one limiter state for every ingress replica (a detached actor), rebuilt from S3 when it restarts
            limiter=RayLimiter.connect(config.limits) if config.limits.enabled else LocalLimiter(config.limits),
            webhooks=self._webhooks,
            events=RayJobEvents(gpus_per_stage(config.deployments, config.usage.gpus_per_stage)))
        self._store, self._limiter, self._ledger = graph.store, graph.limiter, graph.ledger
        self._policy, self._runner, self.service = graph.policy, graph.runner, graph.service
        self._runner.start()
        # the runner's first reclaim scan (at start) resumes what a previous incarnation left behind
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_loop())

    async def _reconcile_loop(self) -> None:
        """Rebuild the shared limiter from S3 when it is new (actor restart) and every reconcile_interval_s."""
        from serve.admission.reconcile import reconcile_limits

        last = 0.0
        while True:
            try:
                due = time.time() - last >= self._config.limits.reconcile_interval_s * (0.8 + 0.4 * random.random())
                if due or await self._limiter.needs_reconcile():
                    now = time.time()
                    await reconcile_limits(self._store, self._ledger, self._limiter, now)
                    last = now
            except Exception:  # noqa: BLE001 - retried on the next tick
                log.warning("limiter reconcile failed", exc_info=True)
            await asyncio.sleep(5)

    def __serve_build_asgi_app__(self):
        from serve.api.routes import create_app

        return create_app(self.service, self._config, self.readiness, self._keyring)

    def _stage_names(self) -> list[str]:
        return [f"{stage.deployment}{self._config.stage_suffix(m)}" for m in self._config.all_models()
                for stage in STAGES]

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(self._storage.check), 5)
            checks["s3"] = True
        except Exception as exc:  # noqa: BLE001
            checks["s3"] = f"unreachable ({type(exc).__name__})"
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5)
            app = serve.get_replica_context().app_name
            deployments = status.applications[app].deployments
            for name in self._stage_names():
                d = deployments.get(name)
                checks[name] = True if d is not None and d.status == "HEALTHY" else (
                    f"not ready ({d.status if d else 'missing'})")
        except Exception as exc:  # noqa: BLE001
            for name in self._stage_names():
                checks.setdefault(name, f"unknown ({type(exc).__name__})")
        return checks

    async def __del__(self) -> None:
        self._reconciler.cancel()
        await self._runner.stop()
        if self._webhooks is not None:
            await self._webhooks.aclose()
        self._policy.close()
