"""Ingress deployment: the HTTP API (FastAPI) and the job runner that chains the stage handles (three, and for
image-to-video the VaeDecoder's image encode beside the text encoder).

The chain passes each `DeploymentResponse` straight into the next stage, so embeddings and latents go
replica to replica and only the VAE's small result (object keys) comes back here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.serve_config import INGRESS_DEPLOYMENT
from serve.config import AppConfig, IngressArgs, IngressSettings, ModelConfig
from serve.config.app import model_app_name
from serve.jobs.record import ChainResult, JobRecord
from serve.jobs.runner import NonRetryableError
from serve.jobs.wiring import IngressGraph
from serve.stages.stage import (
    DENOISER,
    ENHANCER,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    VAE_DECODER,
    StageError,
    StageRefused,
    StageUnavailable,
    first_failed,
    stages_for,
)
from serve.stages.types import GenerationRequest

log = logging.getLogger(__name__)
SETTINGS_RETRY_S = 10.0  # how often a settings change that failed for a passing reason is tried again
CAPACITY_REFRESH_S = 2.0  # how often the stage replicas that chain slots follow are read (a Serve controller call)
CANARY_WAIT_S = 2.0  # how long a readiness probe waits for an S3 canary write it started (a slower one lands later)



class RayPipeline:
    """`serve.jobs.runner.Pipeline` over Ray Serve handles."""

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                 vae_decoder: DeploymentHandle, enhancer: DeploymentHandle | None = None) -> None:
        self._te = text_encoder
        self._den = denoiser
        self._vae = vae_decoder
        self._enh = enhancer  # only a model with `enhance` has one

    async def run(self, job: JobRecord) -> ChainResult:
        req = GenerationRequest(job_id=job.id, prompt=job.prompt, negative_prompt=job.params.negative_prompt,
                                params=job.params.sampling, model=job.model, attempt=job.attempts,
                                tenant=job.tenant, image=job.input_image)
        encoded = self._te.encode.remote(req)
        calls = [(TEXT_ENCODER, encoded)]
        if req.image is None:
            denoised = self._den.denoise.remote(req, encoded)
        else:  # image-to-video: the VAE encodes the stored image beside the text encoder's call
            image = self._vae.encode_image.remote(req)
            calls.append((IMAGE_ENCODER, image))
            denoised = self._den.denoise.remote(req, encoded, image)
        calls.append((DENOISER, denoised))
        if not req.params.enhanced:
            result = self._vae.decode.remote(req, denoised)
            calls.append((VAE_DECODER, result))
        else:  # the frames go from the VaeDecoder to the Enhancer, which uploads the delivered video
            if self._enh is None:
                raise NonRetryableError("invalid_request", f"model {job.model!r} has no Enhancer for this "
                                                           f"job's size or fps factor")
            decoded = self._vae.decode_frames.remote(req, denoised)
            result = self._enh.enhance.remote(req, decoded)
            calls += [(VAE_DECODER, decoded), (ENHANCER, result)]
        responses = [response for _, response in calls]
        try:
            return await result
        except asyncio.CancelledError:
            for response in responses:
                response.cancel()
            raise
        except StageRefused as exc:  # the request itself is bad for the model: retrying cannot help
            raise NonRetryableError("invalid_request", exc.message) from None
        except StageError:  # a stage's own failure, typed in its replica (Ray's task error subclasses it)
            raise
        except Exception as exc:  # Ray's own: a replica died or could not be reached; which one?
            try:
                stage = await first_failed(calls)
            finally:  # an upstream stage may still be computing for this attempt: stop it (also when cancelled)
                for response in responses:
                    response.cancel()
            raise StageUnavailable((stage or calls[-1][0]).deployment, type(exc).__name__) from None


class ModelRouter:
    """`Pipeline` that runs a job on the stage chain of the model it names; `route` changes the models at run
    time (the Ingress's reconfigure), and a chain already running keeps the handles it started with."""

    def __init__(self, grace_s: float = 30.0) -> None:
        self._pipelines: dict[str, RayPipeline] = {}
        self._grace_s = grace_s

    def route(self, pipelines: dict[str, RayPipeline]) -> None:
        self._pipelines = dict(pipelines)

    @property
    def routes(self) -> dict[str, RayPipeline]:
        return dict(self._pipelines)

    async def run(self, job: JobRecord) -> ChainResult:
        pipeline = self._pipelines.get(job.model)
        # Serve rolls a settings change out over the ingress replicas in turn: a replica that has not got it
        # yet may reclaim a job of a model just added. Wait a while for the change before giving up.
        deadline = time.monotonic() + self._grace_s
        while pipeline is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            pipeline = self._pipelines.get(job.model)
        if pipeline is None:  # e.g. a job accepted before the model was removed from the config
            raise NonRetryableError("model_not_found", f"model {job.model!r} is no longer served")
        return await pipeline.run(job)


def model_pipeline(model: ModelConfig) -> RayPipeline:
    """The stage chain of a model: its application's deployments (`model-<name>`), the Enhancer's too for a model
    with `enhance`."""
    app = model_app_name(model.name)
    # no existence check: a model added by the same redeploy may still be building its application; its
    # jobs wait in the router until the handle answers (Serve queues calls for a deployment that comes up)
    handles = [serve.get_deployment_handle(stage.deployment, app, _check_exists=False)
               for stage in stages_for(model.enhance is not None)]
    return RayPipeline(*handles)


@serve.ingress()
class Ingress:
    """Built from its application's `args` (`IngressArgs`: S3 only); every other setting is its deployment's
    `user_config` (`IngressSettings`), applied by `reconfigure`, which Serve calls once the replica is built
    and again on every change, without restarting it."""

    def __init__(self, args: IngressArgs | dict[str, Any]) -> None:
        from deployments.metrics import S3Metrics
        from deployments.stage import route_logs_to_serve
        from serve.storage import Storage

        route_logs_to_serve()  # JSON replica logs, each line with the job (and tenant) it is about
        self._args = args if isinstance(args, IngressArgs) else IngressArgs.model_validate(args)
        self._storage = Storage.from_config(self._args.s3, observer=S3Metrics())
        self._router = ModelRouter()
        self._graph: IngressGraph | None = None
        self._webhooks = None
        self._reconciler: asyncio.Task[None] | None = None
        self._backfill: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._demand: asyncio.Task[None] | None = None
        self._apply = asyncio.Lock()
        self._rejected: str | None = None  # why the last settings change was refused, until one is applied
        self._settings_seen = 0  # settings received; a retry of older ones gives way to newer
        self._retry: asyncio.Task[None] | None = None

    # `rank`: with it in the signature, Serve calls this right after __init__ even without a user_config,
    # so a replica always starts here, from its settings (or the defaults), before it takes a request
    #
    # Serve stops a replica whose reconfigure raises. That is right at start (a replica that cannot run its
    # settings fails with the reason), but a bad change must not take down replicas that are serving: they
    # keep the settings they have, log why the new ones were refused and say so in /readyz until a good
    # change arrives. A failure that may pass (the limiter actor busy, a secrets file not mounted yet: anything
    # but an invalid value) is retried every `SETTINGS_RETRY_S` until it applies or newer settings arrive.
    async def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        self._settings_seen += 1
        await self._configure(user_config, self._settings_seen)

    async def _configure(self, user_config: dict[str, Any] | None, generation: int) -> None:
        async with self._apply:
            if generation != self._settings_seen:  # a retry overtaken by newer settings
                return
            if self._graph is None:
                config = self._config_of(user_config)
                await self._start(config)
            else:
                try:
                    config = self._config_of(user_config)
                    await self._update(config)
                except Exception as exc:  # see above: the previous settings stay
                    self._rejected = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    log.error("new ingress settings refused, the previous ones stay in force: %s", exc)
                    if not isinstance(exc, ValueError):  # ValueError (pydantic's too): invalid, retrying cannot help
                        self._retry = asyncio.get_running_loop().create_task(self._retry_later(user_config, generation))
                    return
                self._rejected = None
        log.info("ingress settings applied: models %s", [m.name for m in config.all_models()])

    def _config_of(self, user_config: dict[str, Any] | None) -> AppConfig:
        return AppConfig.from_parts(IngressSettings.model_validate(user_config or {}), self._args.s3)

    async def _retry_later(self, user_config: dict[str, Any] | None, generation: int) -> None:
        await asyncio.sleep(SETTINGS_RETRY_S)
        await self._configure(user_config, generation)

    def _pipelines(self, config: AppConfig) -> dict[str, RayPipeline]:
        return {m.name: model_pipeline(m) for m in config.all_models()}

    async def _start(self, config: AppConfig) -> None:
        from deployments.limiter import RayLimiter
        from deployments.metrics import RayJobEvents
        from serve.jobs.wiring import build_ingress
        from serve.webhooks.sender import WebhookSender
        from serve.webhooks.signing import WebhookSecrets

        # every `asyncio.to_thread` here is an S3 call (or a few): run them on threads sized for I/O, not CPUs
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=config.s3.io_threads, thread_name_prefix="s3-io"))
        if config.s3.create_bucket:
            await asyncio.to_thread(self._storage.ensure_bucket)
        from deployments.metrics import WebhookMetrics

        self._webhooks = WebhookSender(config.webhooks, WebhookSecrets.from_config(config.webhooks),
                                       on_result=WebhookMetrics())
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
        # jobs written before index-asc/ existed get their oldest-first marker (idempotent; retried next start)
        self._backfill = asyncio.get_running_loop().create_task(self._backfill_ascending_index(graph.store))
        self._retention = asyncio.get_running_loop().create_task(self._retention_loop())
        self._demand = asyncio.get_running_loop().create_task(self._demand_loop())

    @staticmethod
    async def _backfill_ascending_index(store) -> None:
        try:
            n = await asyncio.to_thread(store.backfill_ascending_index)
            if n:
                log.info("ascending index: %d markers backfilled", n)
        except Exception:  # noqa: BLE001 - the next start runs it again
            log.warning("ascending index backfill failed", exc_info=True)

    async def _update(self, config: AppConfig) -> None:
        from serve.webhooks.signing import WebhookSecrets

        # everything that can fail is built before anything changes: a bad file changes nothing
        secrets = WebhookSecrets.from_config(config.webhooks)
        old, new = self._router.routes, self._pipelines(config)
        self._router.route({**old, **new})  # during the change: admission never accepts a model the router lacks
        try:
            await self._graph.reconfigure(config)
        except BaseException:
            self._router.route(old)
            raise
        self._router.route(new)
        self._webhooks.configure(config.webhooks, secrets)

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

    async def _retention_loop(self) -> None:
        """Delete expired jobs every jobs.retention_sweep_interval_s (jittered: replicas spread their sweeps)."""
        while True:
            interval = self._graph.config.jobs.retention_sweep_interval_s
            await asyncio.sleep(interval * (0.5 + random.random()))
            try:
                await self._graph.sweeper.sweep()
            except Exception:  # noqa: BLE001 - the next sweep repeats it
                log.warning("retention sweep failed", exc_info=True)

    async def _demand_loop(self) -> None:
        """Report this replica's jobs per model to the shared limiter (the stages' BacklogPolicy reads the sum) and
        let each model's chain slots follow its stage replicas, every jobs.demand_report_interval_s."""
        capacity_read = -float("inf")
        while True:
            graph = self._graph
            interval = graph.config.jobs.demand_report_interval_s
            try:
                await graph.limiter.report_demand(graph.runner.owner, graph.runner.demand(), 3 * interval)
            except Exception:  # noqa: BLE001 - the policy falls back to Serve's own until reports come again
                log.debug("demand report failed", exc_info=True)
            if time.monotonic() - capacity_read >= max(interval, CAPACITY_REFRESH_S):
                capacity_read = time.monotonic()
                try:
                    slots = await asyncio.to_thread(self._chain_slots)
                    if slots is not None:
                        graph.runner.set_capacity(slots)
                except Exception:  # noqa: BLE001 - the slots stay as they were
                    log.warning("could not read the stage replicas", exc_info=True)
            await asyncio.sleep(interval)

    def _chain_slots(self) -> dict[str, int] | None:
        """Chain slots per model on this replica: the requests its stage replicas that are running take at once
        (replicas x max_ongoing_requests, summed over the stages), shared by the running ingress replicas. A
        model with no stage replica (scaled to zero, or starting) gets 1: that one chain's request is what wakes
        Serve's own cold start, and the BacklogPolicy sees the rest queued."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        apps = details.get("applications") or {}
        try:
            own_app = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - outside a replica
            own_app = None

        def running(app: str | None, deployment: str) -> tuple[int, int]:
            d = ((apps.get(app) or {}).get("deployments") or {}).get(deployment) or {}
            n = sum(1 for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
            return n, int((d.get("deployment_config") or {}).get("max_ongoing_requests") or 1)

        ingresses = max(1, running(own_app, INGRESS_DEPLOYMENT)[0])
        slots = {}
        for model in self._graph.config.all_models():
            app = model_app_name(model.name)
            total = sum(n * per for n, per in (running(app, stage.deployment)
                                               for stage in stages_for(model.enhance is not None)))
            slots[model.name] = max(1, -(-total // ingresses))
        return slots

    async def _reconcile_loop(self) -> None:
        """Rebuild the shared limiter from S3 when it is new (actor restart) and every reconcile_interval_s."""
        from serve.admission.reconcile import reconcile_limits

        last = 0.0
        while True:
            graph = self._graph
            try:
                interval = graph.config.limits.reconcile_interval_s
                due = time.time() - last >= interval * (0.8 + 0.4 * random.random())
                fresh = await graph.limiter.needs_reconcile()
                if fresh:  # a restarted actor starts from the settings it was created with: give it today's
                    await graph.limiter.configure(graph.config.limits)
                if due or fresh:
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
        return [(model_app_name(m.name), stage.deployment) for m in self._graph.config.all_models()
                for stage in stages_for(m.enhance is not None)]

    async def readiness(self) -> dict[str, Any]:
        """S3 and every served model's stages (each model's own application), by `<application>/<deployment>`.

        S3 is ready when it answers a HeadBucket and takes writes: judged from this replica's recent writes, with
        a canary write only after `s3.canary_interval_s` without one (`Storage.write_problem`), never one per probe.
        """
        checks: dict[str, Any] = {}
        if self._rejected is not None:
            checks["settings"] = f"new settings refused ({self._rejected}); the previous ones are in force"
        try:
            await asyncio.wait_for(asyncio.to_thread(self._storage.check), 5)
            writes = await asyncio.to_thread(self._storage.write_problem, CANARY_WAIT_S)
            checks["s3"] = True if writes is None else writes
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
        if self._retry is not None:
            self._retry.cancel()
        if self._reconciler is not None:
            self._reconciler.cancel()
        if self._backfill is not None:
            self._backfill.cancel()
        if self._retention is not None:
            self._retention.cancel()
        if self._demand is not None:
            self._demand.cancel()
        if self._graph is not None:
            await self._graph.runner.stop()
            try:  # its jobs were handed back: another replica reports them from its next scan
                await self._graph.limiter.forget_demand(self._graph.runner.owner)
            except Exception:  # noqa: BLE001 - the report goes stale on its own
                pass
            self._graph.close()
        if self._webhooks is not None:
            await self._webhooks.aclose()
