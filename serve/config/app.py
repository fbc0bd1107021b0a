"""The one typed configuration of the service: models, S3, jobs, API and the sections of every feature.

`deployments/serve_config.py` turns an `AppConfig` into the Serve config file (one application per model
beside the ingress application) and reads one back, so the local CPU run and a GPU cluster differ only in the
YAML they pass. Every section is a leaf module under serve/config/.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from serve.config.accel import AccelConfig
from serve.config.base import Strict, absolute_local_path
from serve.config.deploy import DeploymentsConfig
from serve.config.enhance import EnhanceConfig
from serve.config.limits import LimitsConfig
from serve.config.parallel import ParallelConfig, check_parallel
from serve.config.safety import SafetyConfig
from serve.config.tenancy import KeysConfig, PlansConfig
from serve.config.webhooks import WebhookConfig
from serve.presets import FAMILIES, Family, Preset, preset_for

Dtype = Literal["float32", "float16", "bfloat16"]


class PresetOverrides(Strict):
    """Per-deployment changes to a family's defaults (a tiny local model wants small, fast videos)."""

    width: int | None = Field(default=None, ge=16)
    height: int | None = Field(default=None, ge=16)
    num_frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=120)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0)
    use_dynamic_cfg: bool | None = None
    max_frames: int | None = Field(default=None, ge=1)
    max_side: int | None = Field(default=None, ge=16)
    max_steps: int | None = Field(default=None, ge=1)


class ModelConfig(Strict):
    name: str = Field(default="cogvideox-tiny-2b", description="Name clients pass as `model`.")
    source: str = Field(
        default="./models/tiny-2b", validate_default=True,
        description="Hugging Face id, local directory or s3://bucket/prefix in the diffusers layout.",
    )
    family: Family = Field(default="cogvideox-2b", description=f"One of {sorted(FAMILIES)}.")
    dtype: Dtype | None = Field(default=None, description="Weights dtype; default: the family's preset.")
    text_encoder_dtype: Dtype | None = Field(
        default=None, description="T5 dtype; default bfloat16 on GPU, float32 on CPU."
    )
    device: str = Field(default="auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.")
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("VIDEOGEN_MODEL_CACHE", str(Path.home() / ".cache" / "videogen")),
        description="Where s3:// sources are downloaded once.",
    )
    revision: str | None = Field(default=None, description="Hub revision for a Hugging Face id.")
    aliases: list[str] = Field(default_factory=list, description="Other names accepted for this model.")
    defaults: PresetOverrides = Field(default_factory=PresetOverrides, description="Overrides of the preset.")
    vae_cudnn_benchmark: bool = Field(
        default=False,
        description="torch.backends.cudnn.benchmark on the VAE replica (GPU): cuDNN times the Conv3d decoder's "
                    "algorithms once per latent shape and keeps the fastest; paid in the warm-up decode of each "
                    "warm-up shape (accel.warmup_shapes), by the first request of any other shape.")
    enhance: EnhanceConfig | None = Field(
        default=None,
        description="Super-resolution and frame interpolation after the VAE (the Enhancer stage, its own "
                    "deployment): requests for sizes and frame rates outside what the model generates directly are "
                    "generated inside it and enhanced by an allowed factor (serve/config/enhance.py). None: the "
                    "model delivers only what it generates.")
    accel: AccelConfig = Field(
        default_factory=AccelConfig,
        description="Denoiser speed options (serve/config/accel.py, serve/stages/accel.py): attention backend, torch.compile, fp8, the step "
                    "cache used for quality='speed' requests, warm-up shapes.")
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="One video's denoising across several devices (serve/config/parallel.py): CFG-parallel and "
                    "Ulysses sequence-parallel ranks of one Denoiser replica, which reserves cfg * ulysses bundles "
                    "(deployments.denoiser placement_group_bundles).")

    @model_validator(mode="after")
    def _accel_fits_model(self) -> ModelConfig:
        check_parallel(self.parallel, self.family, self.source, cache=self.accel.cache, compile=self.accel.compile)
        if self.accel.fp8 and self.device == "cpu":
            raise ValueError("model.accel.fp8 needs a CUDA GPU of compute capability >= 8.9 but model.device is 'cpu'")
        if self.accel.fp8 and self.accel.fp8_granularity == "row" and self.resolved_dtype() != "bfloat16":
            raise ValueError(f"model.accel.fp8_granularity 'row' needs bfloat16 weights but the model's dtype is "
                             f"{self.resolved_dtype()}; set model.dtype: bfloat16 or model.accel.fp8_granularity: "
                             "tensor")
        return self

    @field_validator("source", "cache_dir")
    @classmethod
    def _absolute_local_paths(cls, value: str) -> str:
        return absolute_local_path(value)

    def preset(self) -> Preset:
        """The family's preset with this deployment's overrides applied."""
        return replace(preset_for(self.family), **self.defaults.model_dump(exclude_none=True))

    def resolved_dtype(self) -> str:
        return self.dtype or preset_for(self.family).dtype

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]


class S3Config(Strict):
    bucket: str = Field(default="videogen-local", description="Bucket for videos and job records.")
    prefix: str = Field(default="", description="Key prefix inside the bucket (e.g. 'prod/').")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; None for AWS (standard credential chain)."
    )
    region: str = Field(default="us-east-1", description="Signing region.")
    presign_expires_s: int = Field(default=900, ge=1, le=7 * 24 * 3600, description="Presigned URL lifetime.")
    create_bucket: bool = Field(default=False, description="Create the bucket at start (local runs only).")
    multipart_threshold_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    max_attempts: int = Field(default=5, ge=1, le=20, description="botocore total attempts per call.")
    io_threads: int = Field(
        default=64, ge=4, le=512,
        description="Threads an ingress replica runs its blocking S3 calls on (its event loop's default executor; "
                    "asyncio's own is min(32, CPUs + 4), 6 on a 2-core pod, which a burst of POSTs queues behind), "
                    "and the size of each S3 client's connection pool.")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)
    canary_interval_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="/readyz judges whether S3 takes writes from the outcome of the replica's latest write; when "
                    "it has written nothing (real writes or a canary) for this long, a probe writes one tiny object "
                    "(`<prefix>health/canary`) in the background: at most one per interval, never one per probe.")
    canary_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="A canary write still unanswered after this long makes /readyz report S3 not writable until "
                    "it or another write is answered (S3 hanging rather than refusing).")


class JobsConfig(Strict):
    max_attempts: int = Field(default=3, ge=1, le=10, description="Whole-chain attempts before a job fails.")
    lease_s: float = Field(default=30.0, gt=0, description="A job's lease; an expired lease is reclaimed.")
    heartbeat_s: float = Field(default=5.0, gt=0, description="How often the owner renews the lease.")
    reclaim_interval_s: float = Field(default=10.0, gt=0, description="How often replicas scan for orphans.")
    retry_backoff_s: float = Field(default=2.0, ge=0, description="Wait before a retried attempt.")
    attempt_timeout_s: float = Field(default=3600.0, gt=0, description="Upper bound for one chain attempt.")
    retention_s: int = Field(
        default=7 * 24 * 3600, gt=0,
        description="`expires_at` = completion + this; then the job's objects, record and index entries are deleted "
                    "(the ingress's retention sweep; usage records stay for billing).")
    retention_sweep_interval_s: float = Field(
        default=900.0, gt=0, description="How often each ingress replica sweeps expired jobs (with jitter).")
    progress_interval_s: float = Field(default=0.5, ge=0, description="Min seconds between progress writes.")
    max_concurrent_per_replica: int = Field(
        default=64, ge=1,
        description="Ceiling of the jobs one ingress replica drives at once, all models together. Each model's own "
                    "slots follow its stage replicas that are running (their max_ongoing_requests, summed, shared by "
                    "the ingress replicas); this only bounds them, it is not tuned to the Denoiser's replicas.")
    demand_report_interval_s: float = Field(
        default=1.0, gt=0, le=60,
        description="How often each ingress replica reports its jobs per model (queued, running) to the shared "
                    "limiter actor, where the stages' BacklogPolicy reads them, and re-reads the stage replicas its "
                    "chain slots follow.")

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> JobsConfig:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"jobs.heartbeat_s ({self.heartbeat_s}) must be below jobs.lease_s ({self.lease_s})")
        return self


class ApiConfig(Strict):
    api_keys: list[SecretStr] = Field(
        default_factory=lambda: [SecretStr("sk-local-dev")], description="Accepted bearer keys."
    )
    max_prompt_chars: int = Field(default=2000, ge=1, description="Longest accepted prompt, in characters.")
    default_page_limit: int = Field(default=20, ge=1, le=100)
    docs: Literal["public", "authenticated", "off"] = Field(
        default="public",
        description="/openapi.json and /docs: public; `authenticated` (the document needs an API key, no /docs "
                    "page); or `off` (404). The GPU configs ship `off`.")
    content_redirect: bool = Field(
        default=False,
        description="GET .../content answers 302 to a presigned S3 URL instead of streaming through the ingress "
                    "(clients must reach S3; the URL lives s3.presign_expires_s).")
    sync_wait_s: float = Field(
        default=60.0, gt=0,
        description="How long POST /v1/videos/sync waits for the job when the request names no `wait_s`; a job "
                    "that outlives the wait keeps running and the answer (202) says where to poll it.")
    sync_max_wait_s: float = Field(
        default=300.0, gt=0,
        description="The longest wait POST /v1/videos/sync grants. Keep it below the proxy's request timeout "
                    "(Serve's http_options.request_timeout_s and the front proxy's), or the wait is cut off there.")

    @model_validator(mode="after")
    def _sync_wait_in_bounds(self) -> ApiConfig:
        if self.sync_wait_s > self.sync_max_wait_s:
            raise ValueError(f"api.sync_wait_s ({self.sync_wait_s}) must not exceed api.sync_max_wait_s "
                             f"({self.sync_max_wait_s})")
        return self


# The defaults of serve/media/images.py (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS), written out because a config section
# imports no feature module (Pillow would come with it); tests/unit/test_fetch.py checks that they agree.
_DEFAULT_IMAGE_BYTES = 10 * 1024 * 1024
_DEFAULT_IMAGE_PIXELS = 40_000_000


class ImagesConfig(Strict):
    """`images:` — input images of image-to-video requests: their caps, and whether the ingress may fetch one
    from a URL the client names (serve/media/fetch.py)."""

    remote_fetch: bool = Field(
        default=False,
        description="Fetch an input image given as an https:// URL. Off by default: the ingress then makes an HTTP "
                    "request to a host the client chose, checked by the same SSRF guard as webhooks (no private, "
                    "loopback or metadata addresses unless allow-listed, pinned to the checked address, no "
                    "redirects followed), within fetch_timeout_s and max_bytes.")
    allow_http: bool = Field(
        default=False, description="Also fetch plain http:// URLs (private deployments and tests).")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Exact `host` or `host:port` entries (IPv6 as `[::1]:8080`) fetched even when they resolve to "
                    "non-public addresses, as webhooks.allow_hosts: an in-cluster image store, tests.")
    fetch_timeout_s: float = Field(
        default=10.0, gt=0, le=60,
        description="Wall-clock limit of one fetch, from the address check to the last byte.")
    max_bytes: int = Field(
        default=_DEFAULT_IMAGE_BYTES, ge=1,
        description="Largest accepted input image, in bytes (whatever form it comes in); a fetch stops reading "
                    "past it.")
    max_pixels: int = Field(
        default=_DEFAULT_IMAGE_PIXELS, ge=1,
        description="Largest accepted input image, in pixels (width x height, read from the header before "
                    "decoding).")
    max_url_chars: int = Field(
        default=8192, ge=64,
        description="Longest accepted image URL (presigned URLs with session tokens run past 2,000 characters).")

    @field_validator("allow_hosts")
    @classmethod
    def _normalise_hosts(cls, hosts: list[str]) -> list[str]:
        try:  # webhooks' rules and spelling, so one entry means the same in both sections
            return WebhookConfig.model_validate({"allow_hosts": hosts}).allow_hosts
        except ValidationError as e:
            raise ValueError(str(e.errors()[0].get("ctx", {}).get("error", e))) from None


class IdempotencyConfig(Strict):
    """`idempotency:` — how long an Idempotency-Key maps to its job (records in S3, per tenant)."""

    ttl_s: int = Field(default=24 * 3600, gt=0, description="How long a key maps to its job; then it may be reused.")
    replay_wait_s: float = Field(
        default=2.0, ge=0,
        description="How long a retry waits for the first request's job record before answering 409 "
                    "`idempotency_key_in_use` (the first request is still being processed).")
    takeover_after_s: float = Field(
        default=30.0, gt=0,
        description="A claim this old whose job record is missing (its request died before writing it) is taken "
                    "over by the next retry. Keep it well above the time from claim to job record.")
    poll_s: float = Field(default=0.1, gt=0, description="Poll interval while a retry waits for the job record.")


class UsageConfig(Strict):
    """`usage:` — usage records for billing (GPU-seconds per stage of completed jobs)."""

    enabled: bool = Field(default=True, description="Write usage records and serve GET /v1/usage.")
    gpus_per_stage: dict[str, float] | None = Field(
        default=None,
        description="GPUs billed per stage replica (text_encoder/denoiser/vae_decoder; image_encoder, the image "
        "encode on the VaeDecoder, defaults to vae_decoder's); default: the GPUs Ray "
        "assigned the replicas that ran the job (each stage reports its own, so every model bills what it holds).")
    max_range_days: int = Field(default=92, ge=1, le=366, description="Longest period GET /v1/usage accepts.")
    read_concurrency: int = Field(default=16, ge=1, le=128, description="Parallel S3 GETs while summarising.")


class StageSettings(Strict):
    """`user_config` of a model's stage deployments: what a stage replica takes at run time (no reload)."""

    progress_interval_s: float = Field(default=0.5, ge=0, description="Min seconds between progress writes.")


class ModelAppArgs(Strict):
    """`args` of one model's Serve application (`deployments.app:build_model_app`): only what decides what is
    loaded. Serve hashes `args` into the application's code version, so changing them restarts this model's
    replicas, and only this model's."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    s3: S3Config = Field(default_factory=S3Config)


class IngressArgs(Strict):
    """`args` of the ingress application (`deployments.app:build_app`): the bucket its job records live in."""

    s3: S3Config = Field(default_factory=S3Config)


def model_app_name(model_name: str) -> str:
    """The Serve application of a model's stage deployments."""
    return f"model-{model_name}"


class IngressSettings(Strict):
    """`user_config` of the Ingress deployment: everything an operator tunes at run time. Serve applies a
    change through `Ingress.reconfigure` on the running replicas: no model reloads and no replica restarts,
    and the chains in flight go on. `model` and `models` are the catalogue requests pick from; each entry's
    stages are the Serve application `model-<name>` (deployed from the same model entry as its `args`)."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The default model (requests without `model`).")
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="Further models, each with its own Serve application of stage deployments (`model-<name>`); "
                    "a request picks one by name or alias.")
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig, description="Tenant API keys (hashed keys file).")
    plans: PlansConfig = Field(default_factory=PlansConfig, description="Per-plan limits and cost ceilings.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Rate, concurrency, quota, overload.")
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Prompt policy before any GPU work.")
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig, description="Signed video.* events.")
    images: ImagesConfig = Field(
        default_factory=ImagesConfig,
        description="Input images of image-to-video requests: byte and pixel caps, remote fetching "
                    "(serve/media/reference.py, serve/media/fetch.py).")
    usage: UsageConfig = Field(default_factory=UsageConfig)

    @field_validator("model")
    @classmethod
    def _known_family(cls, model: ModelConfig) -> ModelConfig:
        if model.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {sorted(FAMILIES)}, got {model.family!r}")
        return model

    @model_validator(mode="after")
    def _unique_model_names(self) -> IngressSettings:
        seen: set[str] = set()
        for m in self.all_models():
            clash = seen & set(m.names)
            if clash:
                raise ValueError(f"model name or alias {sorted(clash)} is used by two models; names must be unique")
            seen |= set(m.names)
        return self

    def all_models(self) -> list[ModelConfig]:
        return [self.model, *self.models]

    def model_named(self, name: str) -> ModelConfig | None:
        """The model a request's `model` (a name or alias) picks."""
        return next((m for m in self.all_models() if name in m.names), None)


class AppConfig(IngressSettings):
    """The whole service in one document: the ingress's settings, the bucket and each stage deployment's Serve
    options. `deployments/serve_config.py` turns it into the Serve config file Ray deploys (one application per
    model beside the ingress application) and reads one back; configs/*.yaml are such files."""

    s3: S3Config = Field(default_factory=S3Config)
    deployments: DeploymentsConfig = Field(
        default_factory=DeploymentsConfig,
        description="Serve options of each deployment (every model's stages alike); they become the "
                    "`applications[].deployments[]` sections of the Serve config, never `args`.")

    def settings(self) -> IngressSettings:
        """The part the Ingress takes as its `user_config`."""
        return IngressSettings.model_validate({k: getattr(self, k) for k in IngressSettings.model_fields})

    @classmethod
    def from_parts(cls, settings: IngressSettings, s3: S3Config,
                   deployments: DeploymentsConfig | None = None) -> AppConfig:
        return cls.model_validate({**{k: getattr(settings, k) for k in IngressSettings.model_fields}, "s3": s3,
                                   "deployments": deployments or DeploymentsConfig()})
