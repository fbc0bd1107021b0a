"""Denoiser deployment: embeddings + sampling params -> latents (the DiT loop), progress per step.

One request computes at a time (a lock), but `max_ongoing_requests` 2 lets the next request's
embeddings arrive while this one runs. A cancelled request stops at the next step and frees the lock.
"""

from __future__ import annotations

import asyncio
import threading
import time

from serve.config import AppConfig
from serve.stages.types import GenerationRequest, Handoff


class Denoiser:
    def __init__(self, config: AppConfig) -> None:
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.stages.denoising import DenoisingStage
        from serve.stages.runtime import load_stage
        from serve.storage import Storage

        self._config = config
        self._stage = load_stage(DenoisingStage, config)
        self._store = JobStore(Storage.from_config(config.s3, observer=S3Metrics()))
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()

    async def denoise(self, req: GenerationRequest, encoded: Handoff) -> Handoff:
        from serve.jobs.progress import ProgressReporter

        progress = ProgressReporter(self._store, req.job_id, "denoising", self._config.jobs.progress_interval_s,
                                    req.attempt)
        cancel = threading.Event()
        waiting = time.perf_counter()
        async with self._lock:
            self._metrics.lock_acquired(waiting)
            t0 = time.perf_counter()
            progress(0, req.params.num_inference_steps)
            work = asyncio.ensure_future(asyncio.to_thread(
                self._stage.denoise, encoded.value, req.params, on_step=self._metrics.step_timer(progress),
                should_cancel=cancel.is_set))
            try:
                latents = await asyncio.shield(work)
            except asyncio.CancelledError:
                # stop the loop at its next step and keep the lock until it has stopped
                cancel.set()
                self._metrics.cancelled()
                await asyncio.gather(work, return_exceptions=True)
                raise
            await asyncio.to_thread(progress.flush)
            self._metrics.processed(time.perf_counter() - t0)
        return Handoff(value=latents, timings={**encoded.timings, "denoiser_s": time.perf_counter() - t0})
