"""`model.enhance:` — the Enhancer stage of one model: super-resolution and frame interpolation after the VAE.

A model generates directly what its family's preset allows (its *generation envelope*: the size rule up to
`max_side`, its frame rule, its fps). With `enhance`, a request outside that envelope is generated inside it and
enhanced: the spatial factor (2 or 4) must map a size the model makes exactly onto the requested size, and the
frame-rate factor (2 or 4) the model's fps onto the requested fps (serve/jobs/params.py). The factors offered are
those the configured weights can do, up to `max_scale` and `max_fps_factor`. A leaf: no feature module imported.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.config.base import Strict, absolute_local_path

FACTORS = (2, 4)


class EnhanceWeights(Strict):
    source: str = Field(description="Hugging Face id, local directory or s3://bucket/prefix holding the weights.")
    revision: str | None = Field(default=None, description="Hub revision for a Hugging Face id.")

    @field_validator("source")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_local_path(value)


class SrWeights(EnhanceWeights):
    """A single-image SR model that spandrel loads (Real-ESRGAN's RRDBNet x2/x4, SRVGGNetCompact, ...)."""

    scale: Literal[2, 4] = Field(
        description="The weights' own factor (checked when the Enhancer loads them). An x4 model also serves 2x "
                    "requests: its output is downscaled with an antialiased filter.")


class EnhanceConfig(Strict):
    sr: SrWeights | None = Field(default=None, description="Super-resolution weights; None: no size factor.")
    sr_fast: SrWeights | None = Field(
        default=None, description="Lighter SR weights that `quality: speed` requests use where they can do the "
                                  "factor (e.g. SRVGGNetCompact beside RRDBNet).")
    interpolation: EnhanceWeights | None = Field(
        default=None, description="RIFE (Practical-RIFE 4.x IFNet, `flownet.pkl`) weights; None: no fps factor.")
    max_scale: Literal[2, 4] = Field(default=4, description="Largest size factor offered.")
    max_fps_factor: Literal[2, 4] = Field(default=4, description="Largest frame-rate factor offered.")
    tile: int | None = Field(
        default=None, ge=32, description="SR tile side in input pixels; None: whole frames, tiles only for a "
                                         "batch that runs out of GPU memory.")
    batch_size: int = Field(default=4, ge=1, le=64, description="Frames per SR batch, frame pairs per RIFE batch.")
    scene_cut_threshold: float | None = Field(
        default=None, gt=0, le=1,
        description="Mean absolute difference (0..1) between consecutive frames above which the pair is a scene "
                    "cut and is not blended; None: the interpolator's default.")

    @model_validator(mode="after")
    def _something(self) -> EnhanceConfig:
        if self.sr is None and self.interpolation is None:
            raise ValueError("model.enhance needs sr or interpolation weights (or leave enhance out)")
        if self.sr_fast is not None and self.sr is None:
            raise ValueError("model.enhance.sr_fast is the lighter choice beside sr: set sr too")
        return self

    def size_factors(self) -> list[int]:
        """Spatial factors offered: up to max_scale, each one the SR weights do (x4 also does 2x)."""
        if self.sr is None:
            return []
        return [f for f in FACTORS if f <= self.max_scale and f <= self.sr.scale]

    def fps_factors(self) -> list[int]:
        return [f for f in FACTORS if f <= self.max_fps_factor] if self.interpolation is not None else []

    def sr_for(self, factor: int, quality: str) -> Literal["sr", "sr_fast"]:
        """Which SR weights serve `factor`: the lighter ones for `quality: speed` where they can."""
        if quality == "speed" and self.sr_fast is not None and factor <= self.sr_fast.scale:
            return "sr_fast"
        return "sr"
