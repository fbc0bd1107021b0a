"""`deployments:` config section: Ray Serve options per stage deployment (replicas, autoscaling, GPUs)."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=1.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)


class RayActorOptions(_Strict):
    num_cpus: float = Field(default=0.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs (or a fraction) per replica.")
    memory: int | None = Field(default=None, ge=0, description="Bytes of RAM reserved per replica.")
    accelerator_type: str | None = Field(default=None, description="e.g. 'H100'.")
    resources: dict[str, float] | None = Field(
        default=None, description="Custom Ray resources, e.g. {'stage_denoiser': 1} to pin a stage to its worker "
                                  "group (the group advertises the resource in rayStartParams).")
    runtime_env: dict[str, Any] | None = None


class DeploymentOptions(_Strict):
    num_replicas: int | None = Field(default=1, ge=0, description="Fixed replicas; ignored with autoscaling.")
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    max_ongoing_requests: int = Field(default=2, ge=1, description="Requests a replica holds at once.")
    max_queued_requests: int = Field(default=-1, ge=-1, description="Per-caller queue cap; -1 = none.")
    graceful_shutdown_timeout_s: float = Field(default=3600.0, ge=0, description="Above the longest job.")
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, ge=0)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)

    def to_serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(cls, **options)`."""
        opts: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options.model_dump(exclude_none=True),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _ingress_defaults() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=256, graceful_shutdown_timeout_s=30.0)


class DeploymentsConfig(_Strict):
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)
    text_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    denoiser: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vae_decoder: DeploymentOptions = Field(default_factory=DeploymentOptions)


