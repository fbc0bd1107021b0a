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


def size_deliverable(preset: Preset, width: int, height: int, factors: list[int] = ()) -> bool:
    """Generated as it is, or from a size it generates by one of `factors` (super-resolution)."""
    return preset.size_allowed(width, height) or any(
        width % f == 0 and height % f == 0 and preset.size_allowed(width // f, height // f) for f in factors)


def sizes_honoured(preset: Preset, factors: list[int] = ()) -> list[str]:
    """The SDK's sizes this family delivers (with the size factors of its model's Enhancer)."""
    return [s for s in SDK_SIZES if size_deliverable(preset, *(int(v) for v in s.split("x")), factors)]


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

    # 2. Geometry: inside the generation envelope it is generated as asked; outside it, at the size an allowed
    # super-resolution factor maps exactly onto the request, then upscaled (model.enhance)
    width, height, size_param = _geometry(req, preset.width, preset.height)
    enhance = model.enhance
    size_factors = enhance.size_factors() if enhance is not None else []
    sr_factor = 1
    if not preset.size_allowed(width, height):
        sr_factor = next((f for f in size_factors if width % f == 0 and height % f == 0
                          and preset.size_allowed(width // f, height // f)), 0)
        if not sr_factor:
            raise _size_refused(preset, model, width, height, size_param, size_factors)
    gen_width, gen_height = width // sr_factor, height // sr_factor

    # 3. Time: the model's own fps, or an allowed interpolation factor of it; frames follow
    native_fps = preset.fps
    fps = native_fps if req.fps is None else req.fps
    fps_factors = enhance.fps_factors() if enhance is not None else []
    deliverable_fps = [native_fps, *(native_fps * f for f in fps_factors)]
    if fps not in deliverable_fps:
        how = (f"{model.name} generates {native_fps} fps" +
               (f" and interpolates it {' or '.join(f'{f}x' for f in fps_factors)}" if fps_factors else "")
               + f": it delivers fps {deliverable_fps}")
        raise _bad("fps", f"fps {fps} is not possible: {how}; send one of those (or leave fps out for "
                          f"{native_fps})")
    fps_factor = fps // native_fps
    m = preset.frame_multiple
    if req.num_frames is not None:
        param = "num_frames"
        if (req.num_frames - 1) % fps_factor:
            raise _bad("num_frames", f"at {fps} fps ({fps_factor}x interpolation of {native_fps} fps) {model.name} "
                                     f"delivers {fps_factor}(N-1)+1 frames for the N it generates ({m}N+1), e.g. "
                                     f"{fps_factor * (preset.num_frames - 1) + 1}; got {req.num_frames}")
        num_frames = (req.num_frames - 1) // fps_factor + 1
    elif req.seconds is not None:
        num_frames = preset.frames_for_seconds(_parse_seconds(req.seconds), native_fps)
        param = "seconds"
    else:
        num_frames = preset.num_frames
        param = "num_frames"
    if not preset.frames_allowed(num_frames):
        hint = ""
        if param == "seconds":
            hint = (f"; at {fps} fps this model makes at most {_longest_seconds(preset, native_fps)} seconds: of the "
                    f"SDK's values it makes {seconds_honoured(preset, native_fps)}, or any seconds up to that")
        elif fps_factor > 1:
            hint = (f"; at {fps} fps each generated frame pair gets {fps_factor - 1} in between, so it delivers "
                    f"{fps_factor * m + 1} to {fps_factor * (preset.max_frames - 1) + 1} frames in steps of "
                    f"{fps_factor * m}")
        asked = num_frames if fps_factor == 1 else req.num_frames
        raise _bad(param, f"{preset.family} generates {m}N+1 frames, from {m + 1} to {preset.max_frames}; "
                          f"the request asks for {asked} frames (at {fps} fps){hint}")

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

    quality = req.quality or "quality"
    return GenerationParams(
        negative_prompt=req.negative_prompt, width=gen_width, height=gen_height, size=f"{width}x{height}",
        num_frames=num_frames, fps=native_fps,
        seconds=_format_seconds((num_frames - 1) / native_fps), num_inference_steps=steps,
        guidance_scale=float(guidance), use_dynamic_cfg=bool(dynamic), seed=seed, quality=quality,
        image_input=preset.image_input, image_fit=req.image_fit or "stretch", sr_factor=sr_factor,
        fps_factor=fps_factor,
        sr_model=enhance.sr_for(sr_factor, quality) if enhance is not None and sr_factor > 1 else None)


def _size_refused(preset: Preset, model: ModelConfig, width: int, height: int, size_param: str | None,
                  factors: list[int]) -> ServiceError:
    """The 400 for a size neither generated nor reached by an allowed factor: the rule, and what it delivers."""
    if preset.size_rule == "sides":
        bad = next((n, s) for n, s in (("width", width), ("height", height)) if not preset.side_allowed(s))
        rule = (f"{bad[0]} must be a multiple of {preset.side_multiple} between {preset.min_side} and "
                f"{preset.max_side}, got {bad[1]} (size {width}x{height})")
        param = size_param or bad[0]
    else:
        rule = f"{preset.size_rule_text()}, got {width}x{height}"
        param = size_param or _side_at_fault(preset, width, height)
    if factors:
        more = (f"; with {' or '.join(f'{f}x' for f in factors)} super-resolution it also delivers those sizes times "
                f"{' or '.join(str(f) for f in factors)}, e.g. {preset.width * factors[0]}x{preset.height * factors[0]}")
    else:
        more = f"; {model.name} has no super-resolution, so it delivers only what it generates"
    return _bad(param, f"{rule}; its native size is {preset.size}{more}, and of the SDK's sizes it delivers "
                       f"{sizes_honoured(preset, factors) or 'none'}")


def _format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.2f}".rstrip("0")
