"""TextEncoder deployment: prompt (+ negative) -> T5 embeddings, on its own (GPU-share) replicas."""

from __future__ import annotations

import asyncio
import time

from deployments.compute import run_to_end, stage_call
from serve.config import AppConfig
from serve.stages.stage import TEXT_ENCODER
from serve.stages.types import GenerationRequest, Handoff


class TextEncoder:
    def __init__(self, config: AppConfig, model_name: str | None = None) -> None:
        # heavy imports here so the ingress never imports torch
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.stages.loading import load_stage
        from serve.stages.text_encoding import TextEncodingStage
        from serve.storage import Storage

        model = config.model_named(model_name) if model_name else config.model
        self._stage = load_stage(TextEncodingStage, config, model=model, text_encoder=True)
        if model.accel.warmup_on_start:
            self._stage.warmup()  # first-call costs (kernels, allocator) paid here, not by a request
        self._store = JobStore(Storage.from_config(config.s3, observer=S3Metrics()))
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()

    @stage_call(TEXT_ENCODER)
    async def encode(self, req: GenerationRequest) -> Handoff:
        waiting = time.perf_counter()
        async with self._lock:  # one forward at a time; the next request's arguments arrive meanwhile
            self._metrics.lock_acquired(waiting)
            await asyncio.to_thread(self._store.put_progress, req.job_id, TEXT_ENCODER.phase, 0,
                                    req.params.num_inference_steps, attempt=req.attempt)
            t0 = time.perf_counter()
            emb = await run_to_end(self._stage.encode, req.prompt, req.negative_prompt,
                                   req.params.do_classifier_free_guidance)
            self._metrics.processed(time.perf_counter() - t0)
        return Handoff(value=emb, timings={TEXT_ENCODER.timing_key: time.perf_counter() - t0})
