"""Turn a `CreateVideoRequest` into complete, valid generation parameters, or a 400 naming the field.

The job layer's first step (`VideoService.create`), and the way back from a stored job record to the stages'
`SamplingParams` (`GenerationParams.sampling`). Checks what CogVideoX can actually do: frames 8N+1 (16N+1 for CogVideoX1.5), sides multiples of 16,
the family's size rule (the image-to-video transformers make fewer sizes), the family's limits, prompt length, known
model names. Nothing here touches a GPU or S3.
"""

from __future__ import annotations

import math
import secrets

from serve.api.wire import CreateVideoRequest
from serve.config import ApiConfig, ModelConfig
from serve.errors import ServiceError
from serve.presets import Preset
from serve.stages.types import GenerationParams

MAX_SEED = 2**32 - 1
# what the `openai` SDK's types allow (`VideoSeconds`, `VideoSize`): accepted wherever the model can honour them,
# and named in the 400 where it cannot
SDK_SECONDS = ("4", "8", "12")
SDK_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")


def sizes_honoured(preset: Preset) -> list[str]:
    """The SDK's sizes this family can generate."""
    return [s for s in SDK_SIZES if preset.size_allowed(*(int(v) for v in s.split("x")))]


def seconds_honoured(preset: Preset, fps: int) -> list[str]:
    """The SDK's clip lengths this family can generate at `fps`."""
    return [s for s in SDK_SECONDS if preset.frames_allowed(preset.frames_for_seconds(float(s), fps))]


def _longest_seconds(preset: Preset, fps: int) -> str:
    return _format_seconds((preset.max_frames - 1) / fps)


def _side_at_fault(preset: Preset, width: int, height: int) -> str:
    """The field a size-rule 400 names when width and height came as fields: the first one off the rule."""
    if preset.size_rule == "native":
        return "width" if width != preset.width else "height"
    short_name, long_name = ("height", "width") if height <= width else ("width", "height")
    return short_name if min(width, height) != min(preset.width, preset.height) else long_name


def _bad(param: str, message: str) -> ServiceError:
    return ServiceError(400, message, param=param, code="invalid_value")


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise _bad("size", f"size must look like WIDTHxHEIGHT (e.g. '720x480'), got {size!r}") from None
    return w, h


def _parse_seconds(seconds: str) -> float:
    try:
        value = float(seconds)
    except ValueError:
        raise _bad("seconds", f"seconds must be a number of seconds (e.g. '6'), got {seconds!r}") from None
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise _bad("seconds", f"seconds must be between 0 and 3600, got {seconds!r}")
    return value


def _geometry(req: CreateVideoRequest, default_w: int, default_h: int) -> tuple[int, int, str | None]:
    """(width, height, the field an error names): from `size`, or `width` with `height`, or the defaults."""
    given = (req.width is not None, req.height is not None)
    if given == (True, False) or given == (False, True):
        missing = "height" if req.height is None else "width"
        raise _bad(missing, f"width and height come together: {missing} is missing (or send size 'WxH')")
    if req.size:
        width, height = _parse_size(req.size)
        if req.width is not None and (req.width, req.height) != (width, height):
            raise _bad("size", f"size {req.size!r} and width/height {req.width}x{req.height} disagree; send one")
        return width, height, "size"
    if req.width is not None:
        return req.width, req.height, None
    return default_w, default_h, "size"


def resolve_request(req: CreateVideoRequest, model: ModelConfig, api: ApiConfig) -> GenerationParams:
    """Validated parameters with every default filled in; stored in the job record as `params`."""
    preset = model.preset()
    # 1. Prompt and model
    prompt = req.prompt.strip()
    if not prompt:
        raise _bad("prompt", "prompt must not be empty")
    if len(req.prompt) > api.max_prompt_chars:
        raise _bad("prompt", f"prompt is {len(req.prompt)} characters; at most {api.max_prompt_chars} allowed")
    if req.negative_prompt is not None and len(req.negative_prompt) > api.max_prompt_chars:
        raise _bad("negative_prompt", f"negative_prompt is longer than {api.max_prompt_chars} characters")
    if req.model is not None and req.model not in model.names:
        raise ServiceError(400, f"unknown model {req.model!r}; this deployment serves {model.names}",
                       param="model", code="model_not_found")

    if req.image_fit is not None and not preset.image_input:
        raise _bad("image_fit", f"image_fit applies to an input image; {model.name} generates from text")

    # 2. Geometry
    width, height, size_param = _geometry(req, preset.width, preset.height)
    if preset.size_rule == "sides":
        for name, side in (("width", width), ("height", height)):
            if not preset.side_allowed(side):
                raise _bad(size_param or name, f"{name} must be a multiple of {preset.side_multiple} between "
                                               f"{preset.min_side} and {preset.max_side}, got {side} "
                                               f"(size {width}x{height}); this model's native size is {preset.size}, "
                                               f"and of the SDK's sizes it makes {sizes_honoured(preset)}")
    elif not preset.size_allowed(width, height):
        raise _bad(size_param or _side_at_fault(preset, width, height),
                   f"{preset.size_rule_text()}, got {width}x{height}; its native size is {preset.size}, and of the "
                   f"SDK's sizes it makes {sizes_honoured(preset) or 'none'}")

    # 3. Time: frames and fps
    fps = preset.fps if req.fps is None else req.fps
    if not 1 <= fps <= 60:
        raise _bad("fps", f"fps must be between 1 and 60, got {fps}")
    if req.num_frames is not None:
        num_frames = req.num_frames
        param = "num_frames"
    elif req.seconds is not None:
        num_frames = preset.frames_for_seconds(_parse_seconds(req.seconds), fps)
        param = "seconds"
    else:
        num_frames = preset.num_frames
        param = "num_frames"
    if not preset.frames_allowed(num_frames):
        m = preset.frame_multiple
        hint = ""
        if param == "seconds":
            hint = (f"; at {fps} fps this model makes at most {_longest_seconds(preset, fps)} seconds: of the SDK's "
                    f"values it makes {seconds_honoured(preset, fps)}, or any seconds up to that")
        raise _bad(param, f"{preset.family} generates {m}N+1 frames, from {m + 1} to {preset.max_frames}; "
                          f"the request asks for {num_frames} frames (at {fps} fps){hint}")

    # 4. Sampling
    steps = preset.num_inference_steps if req.num_inference_steps is None else req.num_inference_steps
    if not 1 <= steps <= preset.max_steps:
        raise _bad("num_inference_steps", f"num_inference_steps must be 1..{preset.max_steps}, got {steps}")
    guidance = preset.guidance_scale if req.guidance_scale is None else req.guidance_scale
    if not (math.isfinite(guidance) and 0 <= guidance <= preset.max_guidance):
        raise _bad("guidance_scale", f"guidance_scale must be 0..{preset.max_guidance}, got {guidance}")
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    if not 0 <= seed <= MAX_SEED:
        raise _bad("seed", f"seed must be 0..{MAX_SEED}, got {seed}")
    dynamic = preset.use_dynamic_cfg if req.use_dynamic_cfg is None else req.use_dynamic_cfg
    if req.deadline_seconds is not None and not (math.isfinite(req.deadline_seconds)
                                                 and 1 <= req.deadline_seconds <= 7 * 24 * 3600):
        raise _bad("deadline_seconds", f"deadline_seconds must be 1..604800, got {req.deadline_seconds}")

    return GenerationParams(
        negative_prompt=req.negative_prompt, width=width, height=height, size=f"{width}x{height}",
        num_frames=num_frames, fps=fps, seconds=_format_seconds((num_frames - 1) / fps), num_inference_steps=steps,
        guidance_scale=float(guidance), use_dynamic_cfg=bool(dynamic), seed=seed, quality=req.quality or "quality",
        image_input=preset.image_input, image_fit=req.image_fit or "stretch")


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.2f}".rstrip("0")
