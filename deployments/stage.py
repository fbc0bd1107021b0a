"""The skeleton every stage replica shares, once: the job store for progress, one computation at a time
(the lock), lock-wait and compute metrics, its run-time settings (`reconfigure`, no reload) and the GPUs Ray
gave it (reported with every result, for billing). Each stage module keeps what is its own: loading and
warm-up of its stage, and its request method (decorated with `stage_call`, its blocking work run through
`run_to_end`).

A replica is built from its model application's `args` (`ModelAppArgs`: the model entry and S3) only.
`max_ongoing_requests: 2` lets the next request's arguments arrive while the lock is held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from serve.config import ModelAppArgs, ModelConfig, StageSettings
from serve.stages.stage import Stage
from serve.stages.types import GenerationRequest


class Timer:
    """Seconds since the computation started; `seconds` is fixed when it ends."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def assigned_gpus() -> float:
    """The GPUs (or fraction) Ray assigned this replica: what its compute time is billed by."""
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - outside Ray (tests)
        return 0.0


def route_logs_to_serve() -> None:
    """This replica's log lines (every `serve.*` and `deployments.*` logger) go to Ray Serve's replica logger, so
    the deployment's `logging_config` (JSON) writes them to the replica's log file, each with the `job_id` and
    `tenant` of the job it is about (serve/logcontext.py). Called first in every replica's `__init__`.

    Ray Serve writes only its `ray.serve` logger's records there. Its JSON handler sets `job_id` to Ray's own job
    id and then deletes that attribute; the fields go under `ray_serve_extra_fields` instead, which its JSON
    formatter flattens into top-level fields after the handler's filters ran (what ray.llm logs with)."""
    from ray.serve._private.constants import SERVE_LOG_EXTRA_FIELDS, SERVE_LOGGER_NAME

    from serve.logcontext import install

    install(SERVE_LOGGER_NAME, nest_under=SERVE_LOG_EXTRA_FIELDS)


class StageReplica:
    stage: ClassVar[Stage]

    def __init__(self, args: ModelAppArgs | dict[str, Any]) -> None:
        # heavy imports (torch, through the stages) stay in each subclass's __init__; these are light
        from deployments.metrics import S3Metrics, StageMetrics
        from serve.jobs.store import JobStore
        from serve.storage import Storage

        route_logs_to_serve()
        self._args = args if isinstance(args, ModelAppArgs) else ModelAppArgs.model_validate(args)
        self._model: ModelConfig = self._args.model
        self._settings = StageSettings()
        self._storage = Storage.from_config(self._args.s3, observer=S3Metrics())
        self._store = JobStore(self._storage)
        self._lock = asyncio.Lock()
        self._metrics = StageMetrics()
        self._gpus = {self.stage.key: assigned_gpus()}

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """The deployment's `user_config` (`StageSettings`), applied to the running replica."""
        self._settings = StageSettings.model_validate(user_config or {})

    @asynccontextmanager
    async def computing(self, req: GenerationRequest, *, report_phase: bool = True) -> AsyncIterator[Timer]:
        """Hold the replica's one computation slot: wait for the lock (measured), say the job entered this
        stage's phase, time the computation (measured when it succeeds).

        The phase write never holds the lock: it starts when the slot is taken and is awaited only after the slot
        is given back (so a slow S3 write neither delays this computation nor the next request's), and before the
        caller's next progress write (so the phases land in order)."""
        waiting = time.perf_counter()
        phase: asyncio.Future | None = None
        try:
            async with self._lock:
                self._metrics.lock_acquired(waiting)
                if report_phase:
                    phase = asyncio.ensure_future(asyncio.to_thread(
                        self._store.put_progress, req.job_id, self.stage.phase, 0, req.params.num_inference_steps,
                        attempt=req.attempt))
                timer = Timer()
                yield timer
                timer.seconds = timer.elapsed()
                self._metrics.processed(timer.seconds)
        finally:
            if phase is not None:  # best effort (put_progress logs its own failure): never fails the call
                await asyncio.gather(phase, return_exceptions=True)
