"""Complete generation parameters for tests that need a job record but not a real request."""

from __future__ import annotations

from typing import Any

from serve.stages.types import GenerationParams


def example_params(**overrides: Any) -> GenerationParams:
    values: dict[str, Any] = dict(width=720, height=480, num_frames=49, fps=8, seconds="6", num_inference_steps=50,
                                  guidance_scale=6.0, use_dynamic_cfg=False, seed=1)
    values.update(overrides)
    values.setdefault("size", f"{values['width']}x{values['height']}")
    return GenerationParams(**values)
