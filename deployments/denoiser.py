"""Denoiser deployment: embeddings + sampling params -> latents (the DiT loop), progress per step.

One request computes at a time (a lock), but `max_ongoing_requests` 2 lets the next request's
embeddings arrive while this one runs. A cancelled request stops at the next step and frees the lock.
"""

from __future__ import annotations

import asyncio
import threading
import time

from deployments.compute import run_to_end, stage_call
from serve.config import AppConfig
from serve.stages.stage import DENOISER
from serve.stages.types import GenerationRequest, Handoff


class Denoiser:
    def __init__(self, config: AppConfig, model_name: str | None = None) -> None:
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.stages.denoising import DenoisingStage
        from serve.stages.loading import load_stage, warmup_shapes
        from serve.storage import Storage

        model = config.model_named(model_name) if model_name else config.model
        self._config = config
        accel = model.accel
        self._stage = load_stage(DenoisingStage, config, model=model, accel=accel)
        if accel.warmup_on_start:
            # compile and first-call costs for the configured shapes are paid here, not by a request
            self._stage.warmup(warmup_shapes(model, accel), steps=accel.warmup_steps,
                               without_cfg=accel.warmup_without_cfg)
        self._store = JobStore(Storage.from_config(config.s3, observer=S3Metrics()))
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()

    @stage_call(DENOISER)
    async def denoise(self, req: GenerationRequest, encoded: Handoff) -> Handoff:
        from serve.jobs.progress import ProgressReporter

        progress = ProgressReporter(self._store, req.job_id, DENOISER.phase, self._config.jobs.progress_interval_s,
                                    req.attempt)
        cancel = threading.Event()
        waiting = time.perf_counter()
        async with self._lock:
            self._metrics.lock_acquired(waiting)
            t0 = time.perf_counter()
            progress(0, req.params.num_inference_steps)
            def stop_at_next_step() -> None:
                cancel.set()
                self._metrics.cancelled()

            # the lock is kept until the loop has stopped (at its next step) when the request is cancelled
            latents = await run_to_end(self._stage.denoise, encoded.value, req.params,
                                       on_step=self._metrics.step_timer(progress), should_cancel=cancel.is_set,
                                       on_cancel=stop_at_next_step)
            await asyncio.to_thread(progress.flush)
            self._metrics.processed(time.perf_counter() - t0)
            self._metrics.count_uncompiled_runs(self._stage)
            info = {**encoded.info, DENOISER.key: self._stage.last_run_info()}
        return Handoff(value=latents, timings={**encoded.timings, DENOISER.timing_key: time.perf_counter() - t0},
                       info=info)
