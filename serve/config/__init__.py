"""The service's configuration: `AppConfig` and its sections, each a leaf module of this package.

Sections import only pydantic, the presets and each other (safety also the pure-text term matcher, to refuse
a blocked term that can never match). Nothing here imports the web stack, torch or Ray, so every replica and
tool can validate a config cheaply.
"""

from serve.config.accel import AccelConfig
from serve.config.app import (
    ApiConfig,
    AppConfig,
    IdempotencyConfig,
    IngressArgs,
    IngressSettings,
    JobsConfig,
    ModelAppArgs,
    ModelConfig,
    PresetOverrides,
    S3Config,
    StageSettings,
    UsageConfig,
)
from serve.config.deploy import (
    AutoscalingConfig,
    DeploymentOptions,
    DeploymentsConfig,
    RayActorOptions,
)
from serve.config.limits import LimitsConfig, TenantLimits
from serve.config.parallel import ParallelConfig
from serve.config.safety import SafetyConfig
from serve.config.tenancy import KeysConfig, Plan, PlansConfig
from serve.config.webhooks import WebhookConfig

__all__ = [
    "AccelConfig", "ApiConfig", "AppConfig", "AutoscalingConfig", "DeploymentOptions", "DeploymentsConfig",
    "IdempotencyConfig", "IngressArgs", "IngressSettings", "JobsConfig", "KeysConfig", "LimitsConfig",
    "ModelAppArgs", "ModelConfig", "ParallelConfig", "Plan", "PlansConfig", "PresetOverrides", "RayActorOptions", "S3Config",
    "SafetyConfig", "StageSettings", "TenantLimits", "UsageConfig",
    "WebhookConfig",
]
