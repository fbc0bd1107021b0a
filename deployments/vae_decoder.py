"""VaeDecoder deployment: latents -> frames -> mp4 + cover + metadata in S3; returns only object keys."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from deployments.compute import run_to_end, stage_call
from serve.config import AppConfig
from serve.stages.stage import UPLOADING, VAE_DECODER
from serve.stages.types import GenerationRequest, Handoff


class VaeDecoder:
    def __init__(self, config: AppConfig, model_name: str | None = None) -> None:
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.stages.decoding import DecodingStage
        from serve.stages.loading import load_stage, warmup_shapes
        from serve.storage import Storage

        model = config.model_named(model_name) if model_name else config.model
        self._stage = load_stage(DecodingStage, config, model=model, cudnn_benchmark=model.vae_cudnn_benchmark)
        if model.accel.warmup_on_start:
            self._stage.warmup(warmup_shapes(model, model.accel))
        self._storage = Storage.from_config(config.s3, observer=S3Metrics())
        self._store = JobStore(self._storage)
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()

    @stage_call(VAE_DECODER)
    async def decode(self, req: GenerationRequest, denoised: Handoff) -> dict[str, Any]:
        from serve.media.publishing import publish_video, video_keys

        total = req.params.num_inference_steps
        waiting = time.perf_counter()
        async with self._lock:
            self._metrics.lock_acquired(waiting)
            await asyncio.to_thread(self._store.put_progress, req.job_id, VAE_DECODER.phase, 0, total,
                                    attempt=req.attempt)
            t0 = time.perf_counter()
            frames = await run_to_end(self._stage.decode_uint8, denoised.value)
            timings = {**denoised.timings, VAE_DECODER.timing_key: time.perf_counter() - t0}
            self._metrics.processed(timings[VAE_DECODER.timing_key])
            self._metrics.count_tiled_fallbacks(self._stage)
            info = {**denoised.info, VAE_DECODER.key: {"tiled": bool(self._stage.last_decode_tiled)}}
        # encoding and upload run outside the lock: they use the CPU, not the GPU
        await asyncio.to_thread(self._store.put_progress, req.job_id, UPLOADING, 0, total,
                                attempt=req.attempt)
        keys = video_keys(self._storage, req.job_id)
        if not await asyncio.to_thread(self._still_wanted, req.job_id):
            raise RuntimeError(f"job {req.job_id} was cancelled or deleted before its video was uploaded")
        added = await asyncio.to_thread(publish_video, self._storage, keys, req, frames, timings, info)
        if not await asyncio.to_thread(self._still_wanted, req.job_id):
            # deleted while uploading: nothing may outlive the job's record
            await asyncio.to_thread(self._storage.delete_many, list(keys.values()))
            raise RuntimeError(f"job {req.job_id} was deleted while its video was uploaded")
        self._metrics.encoded(added["encode_s"])
        return {"result": keys, "timings": {**timings, **added}}

    def _still_wanted(self, job_id: str) -> bool:
        job = self._store.get(job_id)
        return job is not None and not job.cancel_requested and not job.is_terminal
