"""Every metric the service exports, as plain data: name (unit in the name), kind, description, label keys, buckets.

No Ray here (`serve/` never imports it): `deployments/metrics.py` turns each `Metric` into a `ray.serve.metrics`
object inside a replica, which adds the `deployment`, `replica` and `application` labels, and Ray's metrics agent
exports it on the node's metrics port with a `ray_` prefix (`videogen_jobs_finished_total` is scraped as
`ray_videogen_jobs_finished_total`). Grafana dashboards and alert rules under `k8s/monitoring/` use only these
names or the Ray built-ins listed in `RAY_BUILTIN_METRICS` (tests/unit/test_metrics_catalog.py checks both).

Also here, because `serve/` code reports through them without knowing about Ray:
- `JobEvents`: what the job runner reports (`JobRunner(events=...)`); the base class records nothing;
- `ObservedS3Client`: wraps a boto3 S3 client and reports each call's operation, seconds, bytes and error code to
  a `StorageObserver` (`Storage(observer=...)`).

Label values are bounded by construction: `reason` and `code` are mapped onto fixed sets (`other` otherwise),
`tenant` is bounded by the API keys file (one value per tenant an operator created), `stage`/`kind`/`status`/
`operation` are fixed. Never add a job id, prompt, key or URL as a label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from serve.stages.stage import ALL_STAGES as PIPELINE_STAGES
from serve.stages.stage import BILLED_STAGES, DENOISER, ENHANCER, VAE_DECODER

if TYPE_CHECKING:
    from serve.jobs.record import JobRecord

RAY_PREFIX = "ray_"
Kind = Literal["counter", "gauge", "histogram"]

# ---- buckets (seconds) --------------------------------------------------------------------------------------------
# A stage call ranges from ~10 ms (T5 on a GPU) to tens of minutes (CogVideoX1.5-5B, 81 frames, 50 steps).
STAGE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900, 1200,
                   1800, 2700, 3600)
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
JOB_BUCKETS_S = (1, 2.5, 5, 10, 20, 30, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200)
S3_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENCODE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


@dataclass(frozen=True)
class Metric:
    """One metric as declared to Ray (`name`) and as Prometheus sees it (`exported`, `series`)."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    recorded_by: tuple[str, ...] = ()  # deployments whose replicas record it
    gpu_only: bool = False  # no series at all on a replica without CUDA
    no_panel: str | None = None  # why no dashboard panel shows it (alerts may still use it)

    @property
    def exported(self) -> str:
        return RAY_PREFIX + self.name

    @property
    def series(self) -> tuple[str, ...]:
        """The names Prometheus stores (a histogram is three series families)."""
        if self.kind == "histogram":
            return tuple(f"{self.exported}_{s}" for s in ("bucket", "count", "sum"))
        return (self.exported,)


STAGES = tuple(stage.deployment for stage in PIPELINE_STAGES)  # every stage deployment, the Enhancer too
ALL = ("Ingress", *STAGES)

# ---- stage replicas (TextEncoder, Denoiser, VaeDecoder, Enhancer) -------------------------------------------------
STAGE_PROCESSING = Metric(
    "videogen_stage_processing_seconds", "histogram",
    "Seconds one stage call computed (holding the replica's compute lock): T5 encode, the whole denoising loop, "
    "or VAE decode. The same seconds are billed as GPU-seconds.",
    buckets=STAGE_BUCKETS_S, recorded_by=STAGES)
STAGE_LOCK_WAIT = Metric(
    "videogen_stage_lock_wait_seconds", "histogram",
    "Seconds a request assigned to a stage replica waited for the replica's compute lock (queueing inside the "
    "replica; Serve's own queue is ray_serve_deployment_queued_queries).",
    buckets=WAIT_BUCKETS_S, recorded_by=STAGES)
DENOISE_STEP = Metric(
    "videogen_denoise_step_seconds", "histogram",
    "Seconds per denoising step (one DiT forward, two with CFG, plus the scheduler step).",
    buckets=STEP_BUCKETS_S, recorded_by=(DENOISER.deployment,))
DENOISE_CANCELLED = Metric(
    "videogen_denoise_cancelled_total", "counter",
    "Denoising loops stopped between two steps because their job was cancelled, deleted or timed out.",
    recorded_by=(DENOISER.deployment,))
DENOISE_UNCOMPILED = Metric(
    "videogen_denoise_uncompiled_runs_total", "counter",
    "Denoising loops that ran eagerly under accel.compile because their shape is no compiled bucket "
    "(accel.warmup_shapes, warmup_without_cfg); DenoisingStage.uncompiled_runs.",
    recorded_by=(DENOISER.deployment,),
    no_panel="no series unless accel.compile is on (never in the CPU test cluster, which runs eagerly), so no "
             "dashboard panel can be checked against it: it is used in an alert only.")
VIDEO_ENCODE = Metric(
    "videogen_video_encode_seconds", "histogram",
    "Seconds the replica that delivers the video (the VaeDecoder, or the Enhancer for an enhanced video) spent "
    "encoding frames to mp4 + cover JPEG (CPU, outside the compute lock).",
    buckets=ENCODE_BUCKETS_S, recorded_by=(VAE_DECODER.deployment, ENHANCER.deployment))
TILED_DECODE_FALLBACKS = Metric(
    "videogen_tiled_decode_fallbacks_total", "counter",
    "VAE decodes that ran out of GPU memory untiled and were retried in tiles (DecodingStage.fallbacks).",
    recorded_by=(VAE_DECODER.deployment,),
    no_panel="no series until a real out-of-memory on a GPU (never on CPU), so no dashboard panel can be checked "
            "against a CPU cluster: it is used in an alert only.")
GPU_MEMORY_ALLOCATED = Metric(
    "videogen_gpu_memory_allocated_bytes", "gauge",
    "torch.cuda.memory_allocated() of the replica's device after its last call (tensors alive).",
    recorded_by=STAGES, gpu_only=True)
GPU_MEMORY_RESERVED = Metric(
    "videogen_gpu_memory_reserved_bytes", "gauge",
    "torch.cuda.memory_reserved() after the last call (held by the caching allocator; what nvidia-smi sees).",
    recorded_by=STAGES, gpu_only=True)
GPU_MEMORY_PEAK = Metric(
    "videogen_gpu_memory_peak_bytes", "gauge",
    "torch.cuda.max_memory_allocated() during the last call (peak reset after each call).",
    recorded_by=STAGES, gpu_only=True)
DENOISER_RANK_GPU_MEMORY = Metric(
    "videogen_denoiser_rank_gpu_memory_bytes", "gauge",
    "GPU memory of each rank of a Denoiser replica that spans several GPUs (model.parallel), after its last "
    "request: `memory` allocated, reserved or peak (the request's), `rank` 0 the replica itself, the others its "
    "worker actors (recorded by rank 0, with the replica's labels).",
    tag_keys=("rank", "memory"), recorded_by=(DENOISER.deployment,), gpu_only=True)
PROCESS_RSS = Metric(
    "videogen_process_resident_memory_bytes", "gauge",
    "Resident memory of the replica process (host RAM: weights on CPU, frames, encode buffers).",
    recorded_by=ALL)

# ---- ingress: jobs ------------------------------------------------------------------------------------------------
JOB_QUEUE_WAIT = Metric(
    "videogen_job_queue_wait_seconds", "histogram",
    "Seconds from a job's acceptance (POST /v1/videos) to the start of its first chain attempt.",
    buckets=WAIT_BUCKETS_S, recorded_by=("Ingress",))
JOB_DURATION = Metric(
    "videogen_job_duration_seconds", "histogram",
    "Seconds from acceptance to the terminal status (end to end, queueing and retries included).",
    tag_keys=("status",), buckets=JOB_BUCKETS_S, recorded_by=("Ingress",))
JOBS_FINISHED = Metric(
    "videogen_jobs_finished_total", "counter",
    "Jobs that reached a terminal status, by status and reason (the error code; `none` when completed).",
    tag_keys=("status", "reason"), recorded_by=("Ingress",))
JOB_ATTEMPTS = Metric(
    "videogen_job_attempts_total", "counter",
    "Chain attempts started: kind=first for a job's first attempt, kind=retry for every later one (a retry "
    "after a failed attempt, or a job taken over from a replica that died).",
    tag_keys=("kind",), recorded_by=("Ingress",))
JOB_ATTEMPT_FAILURES = Metric(
    "videogen_job_attempt_failures_total", "counter",
    "Chain attempts that failed, by reason (each is retried until jobs.max_attempts).",
    tag_keys=("reason",), recorded_by=("Ingress",))
INGRESS_QUEUED = Metric(
    "videogen_ingress_queued_jobs", "gauge",
    "Accepted jobs waiting on this ingress replica for a chain slot (jobs.max_concurrent_per_replica).",
    recorded_by=("Ingress",))
INGRESS_RUNNING = Metric(
    "videogen_ingress_running_jobs", "gauge",
    "Jobs this ingress replica is driving (chain in flight, or waiting between attempts).",
    recorded_by=("Ingress",))
WEBHOOK_DELIVERIES = Metric(
    "videogen_webhook_deliveries_total", "counter",
    "Terminal webhooks whose delivery ended, by outcome: delivered, failed (after its retries, or a permanent HTTP "
    "answer) or refused (the address check at send time). Each outcome is also on its job (`webhook`).",
    tag_keys=("outcome",), recorded_by=("Ingress",),
    no_panel="no series until a webhook ends, and the observability traffic sends none; the failure alert reads it")
GPU_SECONDS = Metric(
    "videogen_gpu_seconds_total", "counter",
    "GPU-seconds of completed jobs by tenant and stage (stage seconds x GPUs per replica, as billed). `tenant` is "
    "bounded by the API keys file.",
    tag_keys=("tenant", "stage"), recorded_by=("Ingress",))

# ---- S3, on every replica that talks to it ------------------------------------------------------------------------
S3_REQUEST = Metric(
    "videogen_s3_request_seconds", "histogram",
    "Seconds per S3 call (botocore retries included), by operation; errors are observed too.",
    tag_keys=("operation",), buckets=S3_BUCKETS_S, recorded_by=ALL)
S3_UPLOADED = Metric(
    "videogen_s3_uploaded_bytes_total", "counter",
    "Bytes sent to S3 by successful puts (videos, covers, metadata, job records, usage records).",
    tag_keys=("operation",), recorded_by=ALL)
S3_ERRORS = Metric(
    "videogen_s3_errors_total", "counter",
    "S3 calls that failed after botocore's retries, by operation and error code. A missing key on get/head and a "
    "lost conditional write are answers, not errors.",
    tag_keys=("operation", "code"), recorded_by=ALL)

CATALOG: tuple[Metric, ...] = (
    STAGE_PROCESSING, STAGE_LOCK_WAIT, DENOISE_STEP, DENOISE_CANCELLED, DENOISE_UNCOMPILED, VIDEO_ENCODE,
    TILED_DECODE_FALLBACKS,
    GPU_MEMORY_ALLOCATED, GPU_MEMORY_RESERVED, GPU_MEMORY_PEAK, DENOISER_RANK_GPU_MEMORY, PROCESS_RSS,
    JOB_QUEUE_WAIT, JOB_DURATION, JOBS_FINISHED, JOB_ATTEMPTS, JOB_ATTEMPT_FAILURES, INGRESS_QUEUED, INGRESS_RUNNING,
    GPU_SECONDS, WEBHOOK_DELIVERIES, S3_REQUEST, S3_UPLOADED, S3_ERRORS,
)

# ---- label values -------------------------------------------------------------------------------------------------
# Every label key of the catalog with its possible values (None: bounded elsewhere, documented).
JOB_STATUSES = ("completed", "failed", "cancelled")
JOB_REASONS = ("none", "cancelled", "deadline_exceeded", "internal_error", "stage_timeout", "replica_died",
               "stage_error", "prompt_too_long", "other")
ATTEMPT_KINDS = ("first", "retry")
GPU_STAGE_LABELS = tuple(stage.key for stage in BILLED_STAGES)
S3_OPERATIONS = ("put", "conditional_put", "get", "head", "head_bucket", "list", "delete", "create_bucket")
S3_ERROR_CODES = (
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "NoSuchBucket", "SlowDown",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "BadDigest", "EntityTooLarge",
    "400", "403", "500", "503",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "NoCredentialsError", "S3UploadFailedError", "other",
)
WEBHOOK_OUTCOMES = ("delivered", "failed", "refused")
LABEL_VALUES: dict[str, tuple[str, ...] | None] = {
    "status": JOB_STATUSES,
    "reason": JOB_REASONS,
    "kind": ATTEMPT_KINDS,
    "stage": GPU_STAGE_LABELS,
    "operation": S3_OPERATIONS,
    "code": S3_ERROR_CODES,
    "tenant": None,  # one value per tenant in the keys file (plus the legacy tenant): bounded by the operator
    "outcome": WEBHOOK_OUTCOMES,
    "rank": tuple(str(r) for r in range(32)),  # model.parallel's cfg * ulysses ranks: at most 32
    "memory": ("allocated", "reserved", "peak"),
}
# What Ray adds to every Serve custom metric (bounded by deployments x replicas).
SERVE_TAGS = ("deployment", "replica", "application")


def bounded(value: str | None, allowed: tuple[str, ...], default: str = "other") -> str:
    return value if value in allowed else default


def job_reason(job: JobRecord) -> str:
    if job.status == "completed" or job.error is None:
        return "none"
    return bounded(job.error.code, JOB_REASONS)


def job_age_seconds(job: JobRecord, now: float) -> float:
    """Seconds since the job was accepted (its id carries the acceptance time in ms)."""
    return max(0.0, now - job.created_ms / 1000)


# ---- Ray's own metrics that the dashboards and alerts use ---------------------------------------------------------
# As Ray 2.60 exports them (checked by scraping a running cluster; tests/integration/test_observability.py checks
# that each "node"/"serve" one exists there). "gpu": only on a node with a GPU -- Ray's reporter agent exports no GPU
# series at all on a CPU node, not zeros.
RAY_BUILTIN_METRICS: dict[str, str] = {
    # node, from the reporter agent (labels ip, IsHeadNode, RayNodeType; GPU ones also GpuIndex, GpuDeviceName)
    "ray_node_cpu_utilization": "node",  # percent
    "ray_node_mem_used": "node",  # bytes
    "ray_node_mem_total": "node",
    "ray_node_gpus_utilization": "gpu",  # percent, per GPU
    "ray_node_gram_used": "gpu",  # MiB (Ray's description says bytes; pynvml's value is divided by 1 MiB)
    "ray_node_gram_available": "gpu",  # MiB
    # per process group (label Component, e.g. "ray::ServeReplica:videogen:Denoiser"), GPU ones only once > 0
    "ray_component_gpu_percentage": "gpu",
    "ray_component_gpu_memory_mb": "gpu",
    # Ray Serve (labels application, deployment; replica where per replica; route, method, status_code for HTTP)
    "ray_serve_num_http_requests_total": "serve",
    "ray_serve_http_request_latency_ms_bucket": "serve",
    "ray_serve_deployment_request_counter_total": "serve",
    "ray_serve_deployment_processing_latency_ms_bucket": "serve",
    "ray_serve_deployment_error_counter_total": "serve",  # from a replica's first failed call (exception_type)
    "ray_serve_deployment_queued_queries": "serve",
    "ray_serve_replica_processing_queries": "serve",
    "ray_serve_autoscaling_target_replicas": "serve",  # also without autoscaling (= num_replicas)
    "ray_serve_deployment_replica_healthy": "serve",  # per replica: 1 healthy / 0
    "ray_serve_deployment_replica_starts_total": "serve",  # one series per replica, value 1
    "ray_serve_deployment_status": "serve",  # 1 DEPLOY_FAILED, 2 UNHEALTHY, 3 UPDATING, ..., 6 HEALTHY
}
GPU_ONLY_SERIES: frozenset[str] = frozenset(
    {n for n, k in RAY_BUILTIN_METRICS.items() if k == "gpu"}
    | {s for m in CATALOG if m.gpu_only for s in m.series})


def exported_names() -> dict[str, Metric]:
    """Every series family name Prometheus can hold for the catalog -> its `Metric`."""
    return {s: m for m in CATALOG for s in m.series}


# ---- what the job runner reports ----------------------------------------------------------------------------------
class JobEvents:
    """Hooks the job runner calls (`JobRunner(events=...)`); this base records nothing.

    `deployments.metrics.RayJobEvents` records them as Serve metrics. Implementations must not raise.
    """

    def queue_changed(self, queued: int, running: int) -> None:
        """Jobs waiting for a chain slot / being driven on this replica."""

    def attempt_started(self, job: JobRecord, now: float) -> None:
        """A chain attempt starts (`job.attempts` already counts it)."""

    def attempt_failed(self, job: JobRecord, code: str) -> None:
        """A chain attempt failed with `code` (retried or not)."""

    def job_finished(self, job: JobRecord, now: float) -> None:
        """A terminal transition landed on this replica."""


# ---- S3 call observation ------------------------------------------------------------------------------------------
# (operation, seconds, bytes sent, error code or None)
StorageObserver = Callable[[str, float, int, "str | None"], None]

_OPERATIONS = {
    "put_object": "put", "upload_fileobj": "put", "get_object": "get", "head_object": "head",
    "head_bucket": "head_bucket", "list_objects_v2": "list", "delete_object": "delete", "delete_objects": "delete",
    "create_bucket": "create_bucket",
}
# answers the storage layer expects (missing key, lost compare-and-swap), not failures of S3
_EXPECTED_CODES = frozenset({"404", "NoSuchKey", "NotFound", "412", "PreconditionFailed", "409",
                             "ConditionalRequestConflict"})


def s3_error_code(exc: BaseException) -> str | None:
    """The bounded `code` label of a failed S3 call; None when the answer is an expected one (404, 412)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = str(response.get("Error", {}).get("Code", "") or
                   response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return None if code in _EXPECTED_CODES else bounded(code, S3_ERROR_CODES)
    return bounded(type(exc).__name__, S3_ERROR_CODES)


class ObservedS3Client:
    """A boto3 S3 client that reports every request method it forwards; other attributes pass through."""

    def __init__(self, client: Any, observer: StorageObserver) -> None:
        self._client = client
        self._observer = observer

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        operation = _OPERATIONS.get(name)
        if operation is None:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            op = "conditional_put" if name == "put_object" and ("IfMatch" in kwargs or "IfNoneMatch" in kwargs) \
                else operation
            t0 = time.perf_counter()
            error, raised = None, False
            try:
                return target(*args, **kwargs)
            except Exception as exc:
                error, raised = s3_error_code(exc), True
                raise
            finally:
                sent = 0 if raised else _body_size(name, args, kwargs)
                try:
                    self._observer(op, time.perf_counter() - t0, sent, error)
                except Exception:  # noqa: BLE001 - metrics never fail an S3 call
                    pass

        return call


def _body_size(name: str, args: tuple, kwargs: dict) -> int:
    if name == "put_object":
        body = kwargs.get("Body")
        return len(body) if isinstance(body, (bytes, bytearray, memoryview)) else 0
    if name == "upload_fileobj":
        fileobj = args[0] if args else kwargs.get("Fileobj")
        buffer = getattr(fileobj, "getbuffer", None)
        return buffer().nbytes if buffer is not None else 0
    return 0
