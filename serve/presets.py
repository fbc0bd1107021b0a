"""Model-family presets and what each family accepts; the API resolves a request against these.

The numbers are CogVideoX's published defaults (THUDM/CogVideo README and the diffusers model cards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b"]


@dataclass(frozen=True)
class Preset:
    family: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    scheduler: str
    dtype: str
    frame_multiple: int  # frames must be frame_multiple * N + 1
    max_frames: int
    min_side: int = 16
    max_side: int = 2048
    side_multiple: int = 16
    max_steps: int = 200
    max_guidance: float = 30.0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def frames_allowed(self, n: int) -> bool:
        return n >= self.frame_multiple + 1 and (n - 1) % self.frame_multiple == 0 and n <= self.max_frames

    def frames_for_seconds(self, seconds: float, fps: int) -> int:
        """Smallest allowed frame count that covers `seconds` at `fps` (the first frame is extra)."""
        m = self.frame_multiple
        blocks = max(1, -(-round(seconds * fps) // m))  # ceil
        return blocks * m + 1


FAMILIES: dict[str, Preset] = {
    "cogvideox-2b": Preset(
        family="cogvideox-2b", width=720, height=480, num_frames=49, fps=8, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=False, scheduler="CogVideoXDDIMScheduler", dtype="float16",
        frame_multiple=8, max_frames=49,
    ),
    "cogvideox-5b": Preset(
        family="cogvideox-5b", width=720, height=480, num_frames=49, fps=8, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=8, max_frames=49,
    ),
    "cogvideox1.5-5b": Preset(
        family="cogvideox1.5-5b", width=1360, height=768, num_frames=81, fps=16, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=16, max_frames=161,
    ),
}


def preset_for(family: str) -> Preset:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}") from None
