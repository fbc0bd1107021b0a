"""VaeDecoder deployment: latents -> frames -> mp4 + cover + metadata in S3; returns only object keys."""

from __future__ import annotations

import asyncio

from deployments.compute import run_to_end, stage_call
from deployments.stage import StageReplica
from serve.config import ModelAppArgs
from serve.jobs.record import ChainResult
from serve.stages.stage import UPLOADING, VAE_DECODER
from serve.stages.types import GenerationRequest, Handoff


class VaeDecoder(StageReplica):
    stage = VAE_DECODER

    def __init__(self, args: ModelAppArgs | dict) -> None:
        super().__init__(args)
        from serve.stages.decoding import DecodingStage
        from serve.stages.loading import load_stage, warmup_shapes

        self._stage = load_stage(DecodingStage, self._args, cudnn_benchmark=self._model.vae_cudnn_benchmark)
        if self._model.accel.warmup_on_start:
            self._stage.warmup(warmup_shapes(self._model, self._model.accel))

    @stage_call(VAE_DECODER)
    async def decode(self, req: GenerationRequest, denoised: Handoff) -> ChainResult:
        from serve.jobs.delivery import publish_if_wanted

        async with self.computing(req) as timer:
            frames = await run_to_end(self._stage.decode_uint8, denoised.value)
            self._metrics.count_tiled_fallbacks(self._stage)
            info = {**denoised.info, VAE_DECODER.key: {"tiled": bool(self._stage.last_decode_tiled)}}
        timings = {**denoised.timings, VAE_DECODER.timing_key: timer.seconds}
        # encoding and upload run outside the lock: they use the CPU, not the GPU
        await asyncio.to_thread(self._store.put_progress, req.job_id, UPLOADING, 0, req.params.num_inference_steps,
                                attempt=req.attempt)
        out = await asyncio.to_thread(publish_if_wanted, self._store, self._storage, req, frames, timings, info,
                                    gpus={**denoised.gpus, **self._gpus})
        self._metrics.encoded(out.timings["encode_s"])
        return out
