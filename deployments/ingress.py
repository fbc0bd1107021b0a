"""Ingress deployment: the HTTP API (FastAPI) and the job runner that chains the three stage handles.

The chain passes each `DeploymentResponse` straight into the next stage, so embeddings and latents go
replica to replica and only the VAE's small result (object keys) comes back here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import AppConfig
from serve.jobs.record import JobRecord
from serve.stages.types import GenerationRequest

log = logging.getLogger(__name__)

STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


class RayPipeline:
    """`serve.jobs.runner.Pipeline` over Ray Serve handles."""

    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                 vae_decoder: DeploymentHandle) -> None:
        self._te = text_encoder
        self._den = denoiser
        self._vae = vae_decoder

    async def run(self, job: JobRecord) -> dict[str, Any]:
        from serve.api.validation import sampling_params

        req = GenerationRequest(job_id=job.id, prompt=job.prompt, negative_prompt=job.params.get("negative_prompt"),
                                params=sampling_params(job.params), model=job.model, attempt=job.attempts)
        encoded = self._te.encode.remote(req)
        denoised = self._den.denoise.remote(req, encoded)
        result = self._vae.decode.remote(req, denoised)
        try:
            return await result
        except asyncio.CancelledError:
            for response in (encoded, denoised, result):
                response.cancel()
            raise


@serve.ingress()
class Ingress:
    async def __init__(self, config: AppConfig, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                       vae_decoder: DeploymentHandle) -> None:
        from serve.jobs.runner import JobRunner
        from serve.jobs.service import VideoService
        from serve.jobs.store import JobStore
        from serve.storage import Storage

        self._config = config
        self._storage = Storage.from_config(config.s3)
        if config.s3.create_bucket:
            await asyncio.to_thread(self._storage.ensure_bucket)
        store = JobStore.from_config(self._storage, config.jobs)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests)
            replica = "local"
        owner = f"ingress-{replica}-{uuid.uuid4().hex[:8]}"
        self._runner = JobRunner(store, RayPipeline(text_encoder, denoiser, vae_decoder), config.jobs, owner)
        self.service = VideoService(config, store, self._storage, self._runner)
        self._runner.start()
        # resume what a previous incarnation of the app left behind, without waiting for the first scan
        asyncio.get_running_loop().create_task(self._runner.reclaim_once())

    def __serve_build_asgi_app__(self):
        from serve.api.routes import create_app

        return create_app(self.service, self._config.api, self.readiness)

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
            for name in STAGES:
                d = deployments.get(name)
                checks[name] = True if d is not None and d.status == "HEALTHY" else (
                    f"not ready ({d.status if d else 'missing'})")
        except Exception as exc:  # noqa: BLE001
            for name in STAGES:
                checks.setdefault(name, f"unknown ({type(exc).__name__})")
        return checks

    async def __del__(self) -> None:
        await self._runner.stop()
