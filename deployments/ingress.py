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

from serve.config import AppConfig, IngressArgs, IngressSettings
from serve.config.app import model_app_name
from serve.jobs.record import ChainResult, JobRecord
from serve.jobs.runner import NonRetryableError
from serve.jobs.wiring import IngressGraph
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
    """`Pipeline` that runs a job on the stage chain of the model it names; `route` changes the models at run
    time (the Ingress's reconfigure), and a chain already running keeps the handles it started with."""

    def __init__(self) -> None:
        self._pipelines: dict[str, RayPipeline] = {}

    def route(self, pipelines: dict[str, RayPipeline]) -> None:
        self._pipelines = dict(pipelines)

    async def run(self, job: JobRecord) -> ChainResult:
        pipeline = self._pipelines.get(job.model)
        if pipeline is None:  # e.g. a job accepted before the model was removed from the config
            raise NonRetryableError("model_not_found", f"model {job.model!r} is no longer served")
        return await pipeline.run(job)


def model_pipeline(model_name: str) -> RayPipeline:
    """The stage chain of a model: its application's three deployments (`model-<name>`)."""
    app = model_app_name(model_name)
    return RayPipeline(*(serve.get_deployment_handle(stage.deployment, app) for stage in STAGES))


@serve.ingress()
class Ingress:
    """Built from its application's `args` (`IngressArgs`: S3 only); every other setting is its deployment's
    `user_config` (`IngressSettings`), applied by `reconfigure`, which Serve calls once the replica is built
    and again on every change, without restarting it."""

    def __init__(self, args: IngressArgs | dict[str, Any]) -> None:
        from deployments.metrics import S3Metrics
        from serve.storage import Storage

        self._args = args if isinstance(args, IngressArgs) else IngressArgs.model_validate(args)
        self._storage = Storage.from_config(self._args.s3, observer=S3Metrics())
        self._router = ModelRouter()
        self._graph: IngressGraph | None = None
        self._webhooks = None
        self._reconciler: asyncio.Task[None] | None = None
        self._apply = asyncio.Lock()
        self._rejected: str | None = None  # why the last settings change was refused, until one is applied

    # `rank`: with it in the signature, Serve calls this right after __init__ even without a user_config,
    # so a replica always starts here, from its settings (or the defaults), before it takes a request
    #
    # Serve stops a replica whose reconfigure raises. That is right at start (a replica that cannot run its
    # settings fails with the reason), but a bad change must not take down replicas that are serving: they
    # keep the settings they have, log why the new ones were refused and say so in /readyz until a good
    # change arrives.
    async def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        async with self._apply:
            if self._graph is None:
                config = AppConfig.from_parts(IngressSettings.model_validate(user_config or {}), self._args.s3)
                await self._start(config)
            else:
                try:
                    config = AppConfig.from_parts(IngressSettings.model_validate(user_config or {}), self._args.s3)
                    await self._update(config)
                except Exception as exc:  # see above: the previous settings stay
                    self._rejected = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    log.error("new ingress settings refused, the previous ones stay in force: %s", exc)
                    return
                self._rejected = None
        log.info("ingress settings applied: models %s", [m.name for m in config.all_models()])

    def _pipelines(self, config: AppConfig) -> dict[str, RayPipeline]:
        return {m.name: model_pipeline(m.name) for m in config.all_models()}

    async def _start(self, config: AppConfig) -> None:
        from deployments.limiter import RayLimiter
        from deployments.metrics import RayJobEvents
        from serve.jobs.wiring import build_ingress
        from serve.webhooks.sender import WebhookSender
        from serve.webhooks.signing import WebhookSecrets

        if config.s3.create_bucket:
            await asyncio.to_thread(self._storage.ensure_bucket)
        self._webhooks = WebhookSender(config.webhooks, WebhookSecrets.from_config(config.webhooks))
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests)
            replica = "local"
        self._router.route(self._pipelines(config))
        graph = build_ingress(
            config, storage=self._storage, owner=f"ingress-{replica}-{uuid.uuid4().hex[:8]}", pipeline=self._router,
            # one limiter state for every ingress replica (a detached actor), rebuilt from S3 when it restarts;
            # always the actor, so turning limits on at run time needs no restart
            limiter=RayLimiter.connect(config.limits), webhooks=self._webhooks,
            events=RayJobEvents(lambda: self._graph.config.usage.gpus_per_stage if self._graph else None))
        self._graph = graph
        graph.runner.start()
        # the runner's first reclaim scan (at start) resumes what a previous incarnation left behind
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_loop())

    async def _update(self, config: AppConfig) -> None:
        from serve.webhooks.signing import WebhookSecrets

        secrets = WebhookSecrets.from_config(config.webhooks)  # before anything changes: a bad file changes nothing
        await self._graph.reconfigure(config)
        self._webhooks.configure(config.webhooks, secrets)
        self._router.route(self._pipelines(config))

    # what the routes read per request (serve.api.routes.Live)
    @property
    def service(self):
        return self._graph.service

    @property
    def config(self) -> AppConfig:
        return self._graph.config

    @property
    def keyring(self):
        return self._graph.keyring

    async def _reconcile_loop(self) -> None:
        """Rebuild the shared limiter from S3 when it is new (actor restart) and every reconcile_interval_s."""
        from serve.admission.reconcile import reconcile_limits

        last = 0.0
        while True:
            graph = self._graph
            try:
                interval = graph.config.limits.reconcile_interval_s
                due = time.time() - last >= interval * (0.8 + 0.4 * random.random())
                if due or await graph.limiter.needs_reconcile():
                    now = time.time()
                    await reconcile_limits(graph.store, graph.ledger, graph.limiter, now)
                    last = now
            except Exception:  # noqa: BLE001 - retried on the next tick
                log.warning("limiter reconcile failed", exc_info=True)
            await asyncio.sleep(5)

    def __serve_build_asgi_app__(self):
        from serve.api.routes import create_app

        return create_app(self, self.readiness)  # built before the first reconfigure: it reads `self` per request

    def _stage_checks(self) -> list[tuple[str, str]]:
        """(application, deployment) of every stage of every served model."""
        return [(model_app_name(m.name), stage.deployment) for m in self._graph.config.all_models() for stage in STAGES]

    async def readiness(self) -> dict[str, Any]:
        """S3 and every served model's stages (each model's own application), by `<application>/<deployment>`."""
        checks: dict[str, Any] = {}
        if self._rejected is not None:
            checks["settings"] = f"new settings refused ({self._rejected}); the previous ones are in force"
        try:
            await asyncio.wait_for(asyncio.to_thread(self._storage.check), 5)
            checks["s3"] = True
        except Exception as exc:  # noqa: BLE001
            checks["s3"] = f"unreachable ({type(exc).__name__})"
        stages = self._stage_checks()
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5)
            for app, name in stages:
                application = status.applications.get(app)
                d = application.deployments.get(name) if application is not None else None
                checks[f"{app}/{name}"] = True if d is not None and d.status == "HEALTHY" else (
                    f"not ready ({d.status if d else 'missing'})")
        except Exception as exc:  # noqa: BLE001
            for app, name in stages:
                checks.setdefault(f"{app}/{name}", f"unknown ({type(exc).__name__})")
        return checks

    async def __del__(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
        if self._graph is not None:
            await self._graph.runner.stop()
            self._graph.close()
        if self._webhooks is not None:
            await self._webhooks.aclose()
