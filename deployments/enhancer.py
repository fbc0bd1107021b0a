"""Enhancer deployment: decoded frames -> super-resolution and/or frame interpolation -> mp4 + cover + metadata in S3.

Deployed only in the application of a model with `enhance` (serve/config/enhance.py), on its own replicas with its
own scaling, GPU share and placement; only chains whose request asks for a factor call it (`GenerationRequest.params
.enhanced`): the VaeDecoder then hands it the uint8 frames replica to replica instead of uploading them itself.
Super-resolution runs first, then interpolation at the delivered size (SR costs per frame, RIFE per pixel: upscaling
N frames and interpolating their pairs is cheaper than upscaling 2N-1 frames). Like the VaeDecoder it encodes and
uploads the video itself; only object keys go back to the ingress.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.compute import run_to_end, stage_call
from deployments.stage import StageReplica
from serve.config import ModelAppArgs
from serve.jobs.record import ChainResult
from serve.stages.stage import ENHANCER, UPLOADING
from serve.stages.types import GenerationRequest, Handoff


class Enhancer(StageReplica):
    stage = ENHANCER

    def __init__(self, args: ModelAppArgs | dict) -> None:
        super().__init__(args)
        from serve.stages.enhancing import EnhancingStage
        from serve.stages.loading import resolve_device, weights_dtype

        cfg = self._model.enhance
        if cfg is None:
            raise ValueError(f"model {self._model.name!r} has no `enhance` section: it has no Enhancer")
        device = resolve_device(self._model)
        self._stage = EnhancingStage.from_config(cfg, device=device, dtype=weights_dtype(self._model, device),
                                                 resolve=self._resolve)

    def _resolve(self, source: str, revision: str | None) -> str:
        from serve.models.source import resolve_weights_source

        client = self._storage.client if source.startswith("s3://") else None
        return resolve_weights_source(source, self._model.cache_dir, s3_client=client, revision=revision)

    @stage_call(ENHANCER)
    async def enhance(self, req: GenerationRequest, decoded: Handoff) -> ChainResult:
        """The chain's last call for an enhanced video: upscale, interpolate, encode, upload."""
        from serve.jobs.delivery import publish_if_wanted

        p = req.params
        async with self.computing(req) as timer:
            frames = await run_to_end(self._stage.enhance, decoded.value, sr_factor=p.sr_factor,
                                      fps_factor=p.fps_factor, sr_model=p.sr_model or "sr")
            info: dict[str, Any] = {**decoded.info, ENHANCER.key: self._stage.last_run_info()}
        timings = {**decoded.timings, ENHANCER.timing_key: timer.seconds}
        await asyncio.to_thread(self._store.put_progress, req.job_id, UPLOADING, 0, p.num_inference_steps,
                                attempt=req.attempt)
        out = await asyncio.to_thread(publish_if_wanted, self._store, self._storage, req, frames, timings, info,
                                      gpus={**decoded.gpus, **self._gpus})
        self._metrics.encoded(out.timings["encode_s"])
        return out
