"""`deployments:` config section: Ray Serve options per stage deployment (replicas, autoscaling, GPUs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from serve.config.base import Strict


class AutoscalingPolicyConfig(Strict):
    """`autoscaling_config.policy`: a custom policy function (Ray Serve's `AutoscalingPolicy`). Serve hashes
    it into the application's code version: changing it restarts the application's replicas."""

    policy_function: str = Field(
        default="ray.serve.autoscaling_policy:default_autoscaling_policy",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="'module:function' returning the target replicas.")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the policy.")


class AutoscalingConfig(Strict):
    """Every field of Ray Serve's `AutoscalingConfig` (2.60); unset ones take Ray's defaults. All but `policy`
    are applied by Serve without restarting replicas (a lightweight config update)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=1.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(
        default=None, ge=0, description="Delay before the last replica goes (min_replicas 0); default downscale_delay_s.")
    look_back_period_s: float | None = Field(default=None, gt=0, description="Window the metrics are averaged over.")
    metrics_interval_s: float | None = Field(default=None, gt=0, description="Deprecated by Ray; accepted as is.")
    smoothing_factor: float | None = Field(default=None, gt=0, description="Multiplies every scaling decision.")
    upscale_smoothing_factor: float | None = Field(default=None, gt=0)
    downscale_smoothing_factor: float | None = Field(default=None, gt=0)
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)
    aggregation_function: Literal["mean", "max", "min"] | None = Field(
        default=None, description="How replicas' metrics over the look-back window are combined.")
    policy: AutoscalingPolicyConfig | None = Field(
        default=None, description="A custom autoscaling policy (restarts the application's replicas when changed).")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling_config.max_replicas ({self.max_replicas}) must be >= min_replicas "
                             f"({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling_config.initial_replicas ({self.initial_replicas}) must lie between "
                             f"min_replicas and max_replicas")
        return self


class RayActorOptions(Strict):
    num_cpus: float = Field(default=0.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs (or a fraction) per replica.")
    memory: int | None = Field(default=None, ge=0, description="Bytes of RAM reserved per replica.")
    accelerator_type: str | None = Field(default=None, description="e.g. 'H100'.")
    resources: dict[str, float] | None = Field(
        default=None, description="Custom Ray resources, e.g. {'stage_denoiser': 1} to pin a stage to its worker "
                                  "group (the group advertises the resource in rayStartParams).")
    runtime_env: dict[str, Any] | None = None


class DeploymentOptions(Strict):
    num_replicas: int | None = Field(default=1, ge=0, description="Fixed replicas; ignored with autoscaling.")
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    max_ongoing_requests: int = Field(default=2, ge=1, description="Requests a replica holds at once.")
    max_queued_requests: int = Field(default=-1, ge=-1, description="Per-caller queue cap; -1 = none.")
    graceful_shutdown_timeout_s: float = Field(default=3600.0, ge=0, description="Above the longest job.")
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, ge=0)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    placement_group_bundles: list[dict[str, float]] | None = Field(
        default=None,
        description="Serve's placement group of each replica: one bundle per rank of a Denoiser that spans several "
                    "GPUs (model.parallel), e.g. [{GPU: 1, CPU: 4}, {GPU: 1, CPU: 4}]; the replica sits in the first "
                    "(its ray_actor_options must fit in it), its worker ranks in the others. Unset for a parallel "
                    "model: one copy of ray_actor_options' resources per rank.")
    placement_group_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] | None = Field(
        default=None,
        description="How the bundles are placed; STRICT_PACK (the default with bundles) keeps a replica's ranks on "
                    "one node, over NVLink.")

    @model_validator(mode="after")
    def _bundles(self) -> DeploymentOptions:
        if self.placement_group_bundles is not None:
            if not self.placement_group_bundles:
                raise ValueError("placement_group_bundles needs at least one bundle")
            for i, bundle in enumerate(self.placement_group_bundles):
                if not any(v > 0 for v in bundle.values()) or any(v < 0 for v in bundle.values()):
                    raise ValueError(f"placement_group_bundles[{i}] = {bundle}: Ray refuses a bundle that asks for "
                                     "nothing (or for a negative amount); ask for e.g. {'CPU': 0.01} at least")
            first = self.placement_group_bundles[0]
            wants = {"CPU": self.ray_actor_options.num_cpus, "GPU": self.ray_actor_options.num_gpus,
                     **(self.ray_actor_options.resources or {})}
            short = {k: v for k, v in wants.items() if v > first.get(k, 0)}
            if short:
                raise ValueError(f"ray_actor_options ask for {short} but the first placement group bundle, where the "
                                 f"replica runs, holds {first}: the replica's resources must fit in it")
        elif self.placement_group_strategy is not None:
            raise ValueError("placement_group_strategy needs placement_group_bundles")
        return self

    def with_ranks(self, world: int) -> DeploymentOptions:
        """These options for a replica of `world` ranks (model.parallel): its placement group of `world` bundles,
        each a copy of ray_actor_options' resources unless given, packed on one node unless told otherwise."""
        if world == 1:
            return self
        bundles = self.placement_group_bundles
        if bundles is None:
            actor = self.ray_actor_options
            bundle = {k: v for k, v in {"CPU": actor.num_cpus, "GPU": actor.num_gpus,
                                         **(actor.resources or {})}.items() if v > 0} or {"CPU": 0.01}
            bundles = [dict(bundle) for _ in range(world)]
        elif len(bundles) != world:
            raise ValueError(f"the model's parallel degree needs {world} ranks (model.parallel cfg * ulysses) but the "
                             f"Denoiser's placement_group_bundles has {len(bundles)}; give one bundle per rank")
        return self.model_copy(update={"placement_group_bundles": bundles,
                                       "placement_group_strategy": self.placement_group_strategy or "STRICT_PACK"})

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
        if self.placement_group_bundles is not None:
            opts["placement_group_bundles"] = self.placement_group_bundles
            opts["placement_group_strategy"] = self.placement_group_strategy or "STRICT_PACK"
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _ingress_defaults() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=256, graceful_shutdown_timeout_s=30.0)


class DeploymentsConfig(Strict):
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)
    text_encoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    denoiser: DeploymentOptions = Field(default_factory=DeploymentOptions)
    vae_decoder: DeploymentOptions = Field(default_factory=DeploymentOptions)
    enhancer: DeploymentOptions = Field(
        default_factory=DeploymentOptions,
        description="The Enhancer's options (deployed only in applications of models with `enhance`).")


