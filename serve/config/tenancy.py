"""`keys:` and `plans:` config sections: where tenants' keys come from and what each plan allows (a leaf).

Tenant and plan names share one pattern (`TENANT_PATTERN`), checked here and on every job record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PLAN_PATTERN = TENANT_PATTERN


class KeysConfig(BaseModel):
    """Where tenants' keys come from; wired into AppConfig (e.g. as `keys`)."""

    model_config = ConfigDict(extra="forbid")

    keys_file: str | None = Field(
        default=None,
        description="JSON keys file written by `python -m serve.tenancy.admin`; None = only the plain "
        "`api.api_keys` (local development).",
    )
    reload_interval_s: float = Field(
        default=1.0, ge=0, description="How often the keys file's mtime is checked, so revocations apply live."
    )
    allow_legacy_keys: bool = Field(
        default=False,
        description="With a keys_file, also accept the plain `api.api_keys` (off: the default 'sk-local-dev' "
        "must never open a production deployment).",
    )
    legacy_tenant: str = Field(default="default", pattern=TENANT_PATTERN, description="Tenant of plain keys.")
    legacy_plan: str = Field(default="dev", pattern=PLAN_PATTERN, description="Plan of plain keys.")


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: float = Field(default=10, gt=0, description="Sustained create rate (token refill).")
    burst: int = Field(default=5, ge=1, description="Creates allowed at once above the sustained rate.")
    max_concurrent_jobs: int = Field(default=2, ge=1, description="Queued + in-progress jobs at a time.")
    daily_gpu_seconds: float = Field(default=1800, gt=0, description="GPU-seconds per UTC day, all stages.")
    max_cost: int = Field(
        default=150_000_000, ge=1,
        description="Per-request ceiling of frames x width x height x steps (+ an input image's VAE encode).")
    max_steps: int = Field(default=50, ge=1, description="Most denoising steps one request may ask for.")
    image_input: bool = Field(default=True, description="Image-to-video requests (an input image) are allowed.")


def _default_plans() -> dict[str, Plan]:
    # cost reference points: a CogVideoX-2b/5b default video (720x480, 49 frames, 50 steps) is 846,720,000;
    # a CogVideoX1.5 default (1360x768, 81 frames, 50 steps) is 4,230,144,000
    return {
        # local development and trials: the tiny model at any size it serves, or one short real clip
        "dev": Plan(requests_per_minute=10, burst=5, max_concurrent_jobs=2, daily_gpu_seconds=1800,
                    max_cost=150_000_000, max_steps=50),
        # one default 2b/5b video per request
        "standard": Plan(requests_per_minute=30, burst=10, max_concurrent_jobs=4, daily_gpu_seconds=4 * 3600,
                         max_cost=900_000_000, max_steps=100),
        # default CogVideoX1.5 videos
        "pro": Plan(requests_per_minute=60, burst=20, max_concurrent_jobs=16, daily_gpu_seconds=24 * 3600,
                    max_cost=4_500_000_000, max_steps=200),
        # the longest CogVideoX1.5 clip (161 frames) at 100 steps
        "enterprise": Plan(requests_per_minute=300, burst=60, max_concurrent_jobs=64,
                           daily_gpu_seconds=10 * 24 * 3600, max_cost=20_000_000_000, max_steps=200),
    }


class PlansConfig(BaseModel):
    """Plans by name; wired into AppConfig (e.g. as `plans`). Replacing `plans` replaces all four defaults."""

    model_config = ConfigDict(extra="forbid")

    plans: dict[str, Plan] = Field(default_factory=_default_plans, description="Plan name -> limits.")

    @field_validator("plans")
    @classmethod
    def _names(cls, plans: dict[str, Plan]) -> dict[str, Plan]:
        if not plans:
            raise ValueError("at least one plan is needed")
        bad = [name for name in plans if not re.match(TENANT_PATTERN, name)]
        if bad:
            raise ValueError(f"plan names must match {TENANT_PATTERN}: {bad}")
        return plans

    def get(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise KeyError(f"unknown plan {name!r}; configured plans: {sorted(self.plans)}") from None

    @classmethod
    def load(cls, path: str | Path) -> PlansConfig:
        """From a plans file (`{"plans": {...}}`, YAML or JSON), an AppConfig YAML or a Serve config file."""
        text = Path(path).read_text(encoding="utf-8")
        data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        data = data or {}
        if "applications" in data:
            data = data["applications"][0].get("args", {})
        if isinstance(data.get("plans"), dict) and isinstance(data["plans"].get("plans"), dict):
            data = data["plans"]  # an AppConfig with this model under `plans`
        return cls.model_validate(data)
