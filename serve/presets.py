"""Model-family presets and what each family accepts; the API resolves a request against these.

The numbers are CogVideoX's published defaults (THUDM/CogVideo README and the diffusers model cards).
Image-to-video families take an image with the prompt, and their transformers limit the sizes they make: learned
positional embeddings (CogVideoX-5b-I2V) fit only the training size, and CogVideoX1.5-5B-I2V was trained on a fixed
short side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"]
# "sides": each side a multiple of side_multiple in min_side..max_side (rotary or sin-cos positions follow any size);
# "native": only width x height (learned positional embeddings are fixed at that size);
# "short_side": the short side is min(width, height), the long side from it to max_side in multiples of
# side_multiple, either orientation.
SizeRule = Literal["sides", "native", "short_side"]


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
    image_input: bool = False  # image-to-video: every request brings an image
    size_rule: SizeRule = "sides"

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def size_allowed(self, width: int, height: int) -> bool:
        if self.size_rule == "native":
            return (width, height) == (self.width, self.height)
        if self.size_rule == "short_side":
            short, long = sorted((width, height))
            return (short == min(self.width, self.height) and long <= self.max_side
                    and long % self.side_multiple == 0)
        return self.side_allowed(width) and self.side_allowed(height)

    def side_allowed(self, side: int) -> bool:
        """One side under the "sides" rule."""
        return side % self.side_multiple == 0 and self.min_side <= side <= self.max_side

    def size_rule_text(self) -> str:
        """The sizes this family makes, in the words a 400 uses."""
        if self.size_rule == "native":
            return f"{self.family} makes only its native size {self.size}"
        if self.size_rule == "short_side":
            short = min(self.width, self.height)
            return (f"{self.family} makes sizes whose short side is {short} and long side {short}..{self.max_side} "
                    f"in multiples of {self.side_multiple}")
        return (f"{self.family} makes sizes whose sides are multiples of {self.side_multiple} from {self.min_side} "
                f"to {self.max_side}")

    def frames_allowed(self, n: int) -> bool:
        return n >= self.frame_multiple + 1 and (n - 1) % self.frame_multiple == 0 and n <= self.max_frames

    def frames_for_seconds(self, seconds: float, fps: int) -> int:
        """Smallest allowed frame count that covers `seconds` at `fps` (the first frame is extra)."""
        m = self.frame_multiple
        blocks = max(1, -(-round(seconds * fps) // m))  # ceil
        return blocks * m + 1


FAMILIES: dict[str, Preset] = {
    # generated directly up to 1360 a side (the family's largest trained side, CogVideoX1.5's); larger sizes, such as
    # 1440x960, come from 720x480 through the Enhancer's 2x super-resolution where a model has one
    "cogvideox-2b": Preset(
        family="cogvideox-2b", width=720, height=480, num_frames=49, fps=8, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=False, scheduler="CogVideoXDDIMScheduler", dtype="float16",
        frame_multiple=8, max_frames=49, max_side=1360,
    ),
    "cogvideox-5b": Preset(
        family="cogvideox-5b", width=720, height=480, num_frames=49, fps=8, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=8, max_frames=49, max_side=1360,
    ),
    "cogvideox1.5-5b": Preset(
        family="cogvideox1.5-5b", width=1360, height=768, num_frames=81, fps=16, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=16, max_frames=161,
    ),
    # the 5b's sampling; the transformer takes noise and image latents (in_channels 32) and adds learned positional
    # embeddings trained at 720x480 (diffusers refuses any other size)
    "cogvideox-5b-i2v": Preset(
        family="cogvideox-5b-i2v", width=720, height=480, num_frames=49, fps=8, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=8, max_frames=49, max_side=720, image_input=True, size_rule="native",
    ),
    # the 1.5's sampling plus the ofs embedding; the model card: Min(W, H) = 768, 768 <= Max(W, H) <= 1360,
    # Max(W, H) % 16 = 0, 16N+1 frames with N <= 10
    "cogvideox1.5-5b-i2v": Preset(
        family="cogvideox1.5-5b-i2v", width=1360, height=768, num_frames=81, fps=16, num_inference_steps=50,
        guidance_scale=6.0, use_dynamic_cfg=True, scheduler="CogVideoXDPMScheduler", dtype="bfloat16",
        frame_multiple=16, max_frames=161, max_side=1360, image_input=True, size_rule="short_side",
    ),
}


def preset_for(family: str) -> Preset:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}") from None
