"""Plans: what a tenant's key allows. Looked up after auth (`Principal.plan`), before any job is written.

The per-request ceilings (`max_steps`, `max_cost`) are checked here by `check_cost`, on the parameters that
`serve.api.validation.resolve_request` filled in; the rate, concurrency and daily GPU-seconds limits are read
by the quota stage. A request's cost is `num_frames x width x height x num_inference_steps`: the DiT's work
grows with every one of those factors, so it is a fair single number for "how much GPU this asks for".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.api.errors import ApiError
from serve.jobs.record import TENANT_PATTERN


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: float = Field(default=10, gt=0, description="Sustained create rate (token refill).")
    burst: int = Field(default=5, ge=1, description="Creates allowed at once above the sustained rate.")
    max_concurrent_jobs: int = Field(default=2, ge=1, description="Queued + in-progress jobs at a time.")
    daily_gpu_seconds: float = Field(default=1800, gt=0, description="GPU-seconds per UTC day, all stages.")
    max_cost: int = Field(
        default=150_000_000, ge=1, description="Per-request ceiling of frames x width x height x steps."
    )
    max_steps: int = Field(default=50, ge=1, description="Most denoising steps one request may ask for.")


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

    def resolve(self, name: str) -> Plan:
        """`get` for the request path: a key naming a plan the config lacks is refused, not given defaults."""
        try:
            return self.plans[name]
        except KeyError:
            raise ApiError(403, f"the plan {name!r} of this API key is not configured; contact the operator",
                           code="plan_not_found") from None

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


def cost_of(params: dict[str, Any]) -> int:
    """frames x width x height x steps of resolved parameters."""
    return (int(params["num_frames"]) * int(params["width"]) * int(params["height"])
            * int(params["num_inference_steps"]))


def check_cost(plan: Plan, params: dict[str, Any], plan_name: str | None = None) -> None:
    """400 when the request is over the plan's per-request ceilings, saying what to reduce and by how much."""
    which = f"plan {plan_name!r}" if plan_name else "your plan"
    steps = int(params["num_inference_steps"])
    if steps > plan.max_steps:
        raise ApiError(400, f"num_inference_steps is {steps}; {which} allows at most {plan.max_steps}",
                       param="num_inference_steps", code="max_steps_exceeded")
    cost = cost_of(params)
    if cost <= plan.max_cost:
        return
    frames, width, height = int(params["num_frames"]), int(params["width"]), int(params["height"])
    per_step = frames * width * height
    fitting_steps = plan.max_cost // per_step
    if fitting_steps >= 1:
        # the cheapest fix that keeps the requested video's size and length
        hint = f"reduce num_inference_steps to {fitting_steps} or less, or lower num_frames or size"
        param = "num_inference_steps"
    else:
        hint = "even one step at this size and length is over it: lower size or num_frames"
        param = "size"
    raise ApiError(
        400,
        f"this request costs {cost:,} (num_frames {frames} x width {width} x height {height} x "
        f"num_inference_steps {steps}); {which} allows at most {plan.max_cost:,} per request; {hint}",
        param=param, code="cost_ceiling_exceeded",
    )

