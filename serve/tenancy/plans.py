"""Plans: what a tenant's key allows. Looked up after auth (`Principal.plan`), before any job is written.

The per-request ceilings (`max_steps`, `max_cost`) are checked here by `check_cost`, on the parameters that
`serve.jobs.params.resolve_request` filled in; the rate, concurrency and daily GPU-seconds limits are read
by the quota stage. A request's cost is `num_frames x width x height x num_inference_steps`: the DiT's work
grows with every one of those factors, so it is a fair single number for "how much GPU this asks for". An
image-to-video request adds its VAE encode (`GenerationParams.image_encode_cost`); a plan may leave image input
out (`Plan.image_input`, a 403).
"""

from __future__ import annotations

from serve.config.tenancy import Plan, PlansConfig
from serve.errors import ServiceError
from serve.stages.types import GenerationParams


def resolve_plan(plans: PlansConfig, name: str) -> Plan:
    """The plan of a request's key: a key naming a plan the config lacks is refused, not given defaults."""
    try:
        return plans.plans[name]
    except KeyError:
        raise ServiceError(403, f"the plan {name!r} of this API key is not configured; contact the operator",
                           code="plan_not_found") from None


def cost_of(params: GenerationParams) -> int:
    """frames x width x height x steps of resolved parameters."""
    return params.cost


def check_inputs(plan: Plan, params: GenerationParams, plan_name: str | None = None) -> None:
    """403 when the plan does not include what the request generates from (an input image)."""
    if params.image_input and not plan.image_input:
        which = f"plan {plan_name!r}" if plan_name else "your plan"
        raise ServiceError(403, f"{which} does not include image-to-video (input_reference); ask the operator for a "
                                f"plan with image input, or send a text-only request to a text-to-video model",
                           param="input_reference", code="image_input_not_allowed")


def check_cost(plan: Plan, params: GenerationParams, plan_name: str | None = None) -> None:
    """400 when the request is over the plan's per-request ceilings, saying what to reduce and by how much."""
    check_inputs(plan, params, plan_name)
    which = f"plan {plan_name!r}" if plan_name else "your plan"
    steps = params.num_inference_steps
    if steps > plan.max_steps:
        raise ServiceError(400, f"num_inference_steps is {steps}; {which} allows at most {plan.max_steps}",
                       param="num_inference_steps", code="max_steps_exceeded")
    cost = cost_of(params)
    if cost <= plan.max_cost:
        return
    frames, width, height = params.num_frames, params.width, params.height
    per_step = frames * width * height
    fitting_steps = (plan.max_cost - params.image_encode_cost - params.enhance_cost) // per_step
    if fitting_steps >= 1:
        # the cheapest fix that keeps the requested video's size and length
        hint = f"reduce num_inference_steps to {fitting_steps} or less, or lower num_frames or size"
        param = "num_inference_steps"
    else:
        hint = "even one step at this size and length is over it: lower size or num_frames"
        param = "size"
    encode = (f" + {params.image_encode_cost:,} for the input image's VAE encode" if params.image_encode_cost
              else "")
    if params.enhance_cost:
        encode += (f" + {params.enhance_cost:,} for the enhanced output ({params.delivered_frames} frames of "
                   f"{params.delivered_width}x{params.delivered_height})")
    raise ServiceError(
        400,
        f"this request costs {cost:,} (num_frames {frames} x width {width} x height {height} x "
        f"num_inference_steps {steps}{encode}); {which} allows at most {plan.max_cost:,} per request; {hint}",
        param=param, code="cost_ceiling_exceeded",
    )

