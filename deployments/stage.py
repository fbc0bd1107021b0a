"""The skeleton every stage replica shares, once: the job store for progress, one computation at a time
(the lock), lock-wait and compute metrics. Each stage module keeps what is its own: loading and warm-up of
its stage, and its request method (decorated with `stage_call`, its blocking work run through `run_to_end`).

`max_ongoing_requests: 2` lets the next request's arguments arrive while the lock is held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

from serve.config import AppConfig, ModelConfig
from serve.stages.stage import Stage
from serve.stages.types import GenerationRequest


class Timer:
    """Seconds since the computation started; `seconds` is fixed when it ends."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class StageReplica:
    stage: ClassVar[Stage]

    def __init__(self, config: AppConfig, model_name: str | None = None) -> None:
        # heavy imports (torch, through the stages) stay in each subclass's __init__; these are light
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.storage import Storage

        self._config = config
        self._model: ModelConfig = config.model_named(model_name) if model_name else config.model
        self._storage = Storage.from_config(config.s3, observer=S3Metrics())
        self._store = JobStore(self._storage)
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()

    @asynccontextmanager
    async def computing(self, req: GenerationRequest, *, report_phase: bool = True) -> AsyncIterator[Timer]:
        """Hold the replica's one computation slot: wait for the lock (measured), say the job entered this
        stage's phase, time the computation (measured when it succeeds)."""
        waiting = time.perf_counter()
        async with self._lock:
            self._metrics.lock_acquired(waiting)
            if report_phase:
                await asyncio.to_thread(self._store.put_progress, req.job_id, self.stage.phase, 0,
                                        req.params.num_inference_steps, attempt=req.attempt)
            timer = Timer()
            yield timer
            timer.seconds = timer.elapsed()
            self._metrics.processed(timer.seconds)
