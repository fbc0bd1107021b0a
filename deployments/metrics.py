"""The catalog of `serve/metrics.py` as `ray.serve.metrics` objects, created inside a replica.

Created in a deployment's `__init__`, so Ray adds the `deployment`, `replica` and `application` labels; Ray's
metrics agent exports them on the node's metrics port (prefix `ray_`). No replica runs its own metrics server.
Recording never raises into the service: a metrics bug costs a data point, not a job.

Ray 2.60's metrics agent drops a gauge value that was not set again within two report intervals
(2 x metrics_report_interval_ms, 20 s by default) -- Serve re-sets its own gauges for the same reason -- so every
gauge here is re-set by one daemon thread per replica process every `REFRESH_S` seconds.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.serve import metrics as serve_metrics

from serve.billing.usage import gpu_seconds_from_timings, gpus_per_stage
from serve.jobs.record import JobRecord
from serve.metrics import (
    ATTEMPT_KINDS,
    DENOISE_CANCELLED,
    DENOISE_STEP,
    DENOISE_UNCOMPILED,
    DENOISER_RANK_GPU_MEMORY,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_PEAK,
    GPU_MEMORY_RESERVED,
    GPU_SECONDS,
    GPU_STAGE_LABELS,
    INGRESS_QUEUED,
    INGRESS_RUNNING,
    JOB_ATTEMPT_FAILURES,
    JOB_ATTEMPTS,
    JOB_DURATION,
    JOB_QUEUE_WAIT,
    JOB_REASONS,
    JOBS_FINISHED,
    PROCESS_RSS,
    S3_ERRORS,
    S3_REQUEST,
    S3_UPLOADED,
    STAGE_LOCK_WAIT,
    STAGE_PROCESSING,
    TILED_DECODE_FALLBACKS,
    VIDEO_ENCODE,
    WEBHOOK_DELIVERIES,
    WEBHOOK_OUTCOMES,
    JobEvents,
    Metric,
    bounded,
    job_age_seconds,
    job_reason,
)

log = logging.getLogger(__name__)

REFRESH_S = 5.0


class _Refresher:
    """Calls the registered gauge refreshers every `REFRESH_S` seconds on one daemon thread."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="videogen-metrics-refresh", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            with self._lock:
                callbacks = list(self._callbacks)
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - a metrics bug must not kill the thread
                    log.debug("gauge refresh failed", exc_info=True)


_refresher = _Refresher()


def create(spec: Metric) -> Any:
    """A Serve metric for `spec` (call inside a replica, so the Serve labels are added)."""
    tag_keys = spec.tag_keys or None
    if spec.kind == "counter":
        return serve_metrics.Counter(spec.name, description=spec.description, tag_keys=tag_keys)
    if spec.kind == "gauge":
        return serve_metrics.Gauge(spec.name, description=spec.description, tag_keys=tag_keys)
    return serve_metrics.Histogram(spec.name, description=spec.description, boundaries=list(spec.buckets),
                                   tag_keys=tag_keys)


def _never_raises(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.debug("metric %s not recorded", fn.__name__, exc_info=True)
            return None

    return wrapper


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux


class S3Metrics:
    """A `StorageObserver`: `Storage.from_config(cfg, observer=S3Metrics())`."""

    def __init__(self) -> None:
        self._seconds = create(S3_REQUEST)
        self._bytes = create(S3_UPLOADED)
        self._errors = create(S3_ERRORS)

    @_never_raises
    def __call__(self, operation: str, seconds: float, sent: int, error: str | None) -> None:
        tags = {"operation": operation}
        self._seconds.observe(seconds, tags=tags)
        if error is not None:
            self._errors.inc(tags={"operation": operation, "code": error})
        elif sent > 0:
            self._bytes.inc(sent, tags=tags)


class StageMetrics:
    """Per stage replica: compute seconds, lock wait, denoising steps, memory."""

    def __init__(self) -> None:
        self._processing = create(STAGE_PROCESSING)
        self._lock_wait = create(STAGE_LOCK_WAIT)
        self._step = create(DENOISE_STEP)
        self._cancelled = create(DENOISE_CANCELLED)
        self._encode = create(VIDEO_ENCODE)
        self._tiled = create(TILED_DECODE_FALLBACKS)
        self._uncompiled = create(DENOISE_UNCOMPILED)
        self._seen: dict[str, int] = {}  # stage counters already exported, by attribute
        self._rss = create(PROCESS_RSS)
        self._gpu = None
        self._last_peak: int | None = None
        torch = sys.modules.get("torch")  # a stage replica has imported it; never import it for metrics
        self._rank_memory = None
        if torch is not None and torch.cuda.is_available():
            self._gpu = (create(GPU_MEMORY_ALLOCATED), create(GPU_MEMORY_RESERVED), create(GPU_MEMORY_PEAK))
            self._rank_memory = create(DENOISER_RANK_GPU_MEMORY)
        self.sample_memory()
        _refresher.add(lambda: self.sample_memory(peak=False))

    @_never_raises
    def lock_acquired(self, waiting_since: float) -> None:
        """Call right after acquiring the compute lock with the `time.perf_counter()` taken before waiting."""
        self._lock_wait.observe(time.perf_counter() - waiting_since)

    @_never_raises
    def processed(self, seconds: float) -> None:
        self._processing.observe(seconds)
        self.sample_memory(peak=True)

    def step_timer(self, on_step: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """Wrap the denoising loop's `on_step(step, total)`: observes the seconds since the previous step."""
        last = [time.perf_counter()]

        def timed(step: int, total: int) -> None:
            now = time.perf_counter()
            self._observe_step(now - last[0])
            last[0] = now
            on_step(step, total)

        return timed

    @_never_raises
    def _observe_step(self, seconds: float) -> None:
        self._step.observe(seconds)

    @_never_raises
    def cancelled(self) -> None:
        self._cancelled.inc()

    @_never_raises
    def encoded(self, seconds: float) -> None:
        self._encode.observe(seconds)

    def count_tiled_fallbacks(self, stage: Any) -> None:
        """After a VAE decode: count the stage's out-of-memory -> tiled retries (`DecodingStage.fallbacks`)
        since the last call, so warm-up fallbacks count too."""
        self._count_stage_counter(stage, "fallbacks", self._tiled)

    def count_uncompiled_runs(self, stage: Any) -> None:
        """After a denoise: count the requests that ran eagerly under compile (`DenoisingStage.uncompiled_runs`)."""
        self._count_stage_counter(stage, "uncompiled_runs", self._uncompiled)

    @_never_raises
    def _count_stage_counter(self, stage: Any, attribute: str, counter: Any) -> None:
        """Add what the stage's monotonic `attribute` (0 if absent) grew by since the last call to `counter`."""
        total = int(getattr(stage, attribute, 0) or 0)
        seen = self._seen.get(attribute, 0)
        if total > seen:
            counter.inc(total - seen)
        self._seen[attribute] = max(total, seen)

    @_never_raises
    def rank_memory(self, readings: Mapping[int, Mapping[str, int]]) -> None:
        """Each rank's GPU memory readings (deployments/ranks.py `memory_readings`), by rank; none on CPU."""
        if self._rank_memory is None:
            return
        for rank, values in readings.items():
            for kind, value in values.items():
                self._rank_memory.set(value, tags={"rank": str(rank), "memory": kind})

    @_never_raises
    def sample_memory(self, peak: bool = False) -> None:
        """RSS and, on a GPU, torch's allocator: `peak=True` after a call reads and resets the peak of that call;
        the periodic refresh re-sets the last call's peak."""
        rss = _resident_bytes()
        if rss is not None:
            self._rss.set(rss)
        if self._gpu is not None:
            torch = sys.modules["torch"]
            if torch.cuda.is_initialized():
                allocated, reserved, peak_gauge = self._gpu
                allocated.set(torch.cuda.memory_allocated())
                reserved.set(torch.cuda.memory_reserved())
                if peak or self._last_peak is None:
                    self._last_peak = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                peak_gauge.set(self._last_peak)


class RayJobEvents(JobEvents):
    """The job runner's events as Serve metrics (`JobRunner(events=RayJobEvents(gpus))`).

    GPU-seconds are counted as billing counts them (`serve.billing.usage.gpus_per_stage`): the GPUs the job's
    replicas held, or the `usage.gpus_per_stage` override that `gpus_override()` returns (it is read per job, so
    a change through the Ingress's user_config applies to the next job).
    """

    def __init__(self, gpus_override: Callable[[], Mapping[str, float] | None] = lambda: None) -> None:
        self._gpus_override = gpus_override
        self._queue_wait = create(JOB_QUEUE_WAIT)
        self._duration = create(JOB_DURATION)
        self._finished = create(JOBS_FINISHED)
        self._attempts = create(JOB_ATTEMPTS)
        self._attempt_failures = create(JOB_ATTEMPT_FAILURES)
        self._queued = create(INGRESS_QUEUED)
        self._running = create(INGRESS_RUNNING)
        self._gpu_seconds = create(GPU_SECONDS)
        self._rss = create(PROCESS_RSS)
        self._depth = (0, 0)
        self.queue_changed(0, 0)
        _refresher.add(self._refresh)

    @_never_raises
    def queue_changed(self, queued: int, running: int) -> None:
        self._depth = (queued, running)
        self._queued.set(queued)
        self._running.set(running)

    @_never_raises
    def _refresh(self) -> None:
        queued, running = self._depth
        self._queued.set(queued)
        self._running.set(running)
        rss = _resident_bytes()
        if rss is not None:
            self._rss.set(rss)

    @_never_raises
    def attempt_started(self, job: JobRecord, now: float) -> None:
        kind = ATTEMPT_KINDS[0] if job.attempts <= 1 else ATTEMPT_KINDS[1]
        self._attempts.inc(tags={"kind": kind})
        if kind == "first":
            self._queue_wait.observe(job_age_seconds(job, now))

    @_never_raises
    def attempt_failed(self, job: JobRecord, code: str) -> None:
        self._attempt_failures.inc(tags={"reason": bounded(code, JOB_REASONS)})

    @_never_raises
    def job_finished(self, job: JobRecord, now: float) -> None:
        self._finished.inc(tags={"status": job.status, "reason": job_reason(job)})
        self._duration.observe(job_age_seconds(job, now), tags={"status": job.status})
        if job.status == "completed":
            for stage, seconds in gpu_seconds_from_timings(job.timings,
                                                              gpus_per_stage(job, self._gpus_override())).items():
                if seconds > 0 and stage in GPU_STAGE_LABELS:
                    self._gpu_seconds.inc(seconds, tags={"tenant": job.tenant, "stage": stage})


class WebhookMetrics:
    """`WebhookSender(on_result=...)`: each ended delivery counted by outcome."""

    def __init__(self) -> None:
        self._deliveries = create(WEBHOOK_DELIVERIES)

    @_never_raises
    def __call__(self, result: Any) -> None:
        self._deliveries.inc(tags={"outcome": bounded(result.outcome, WEBHOOK_OUTCOMES, "failed")})
