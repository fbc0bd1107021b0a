"""Typed values that cross stage boundaries (TextEncoder -> Denoiser -> VaeDecoder).

Everything here is plain numpy on the CPU so Ray can ship it between replicas without copying
through the GPU (see FIELD-NOTES: CUDA tensors get copied to CPU and back anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class AccelUnavailable(RuntimeError):
    """A requested speed option cannot run on this replica (device, capability or package missing)."""


# "quality": the exact model; "speed": the denoiser's configured step cache (lossy), if any.
Quality = Literal["quality", "speed"]


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks the denoiser and decoder for (already validated by the API)."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    seed: int
    fps: int
    quality: Quality = "quality"

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0


class GenerationParams(BaseModel):
    """Everything one video is generated with, resolved once from the request (serve/jobs/params.py), stored
    in its job record and given to the stages (as `sampling`): frozen, never re-derived."""

    # extra="allow", a plain-str quality: a record written by a newer replica (a field or a quality value this
    # version does not know) survives this version's read-modify-write during a rolling upgrade
    model_config = ConfigDict(frozen=True, extra="allow")

    negative_prompt: str | None = None
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    size: str = Field(description="WIDTHxHEIGHT, as the API shows it.")
    num_frames: int = Field(ge=1)
    fps: int = Field(ge=1)
    seconds: str = Field(description="(num_frames - 1) / fps, as the API shows it.")
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    use_dynamic_cfg: bool
    seed: int = Field(ge=0)
    quality: str = Field(default="quality", description="'quality' or 'speed' (validated at the API).")

    @property
    def sampling(self) -> SamplingParams:
        """What the denoiser and decoder need of it."""
        return SamplingParams(
            num_frames=self.num_frames, height=self.height, width=self.width,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            use_dynamic_cfg=self.use_dynamic_cfg, seed=self.seed, fps=self.fps,
            quality="speed" if self.quality == "speed" else "quality")

    @property
    def cost(self) -> int:
        """frames x width x height x steps: how much DiT work it asks for (plans cap it)."""
        return self.num_frames * self.width * self.height * self.num_inference_steps


@dataclass(frozen=True)
class PromptEmbeddings:
    """T5 output for one prompt, padded to ``max_sequence_length`` tokens (no attention mask).

    Arrays are float32 ``[1, seq_len, hidden]`` whatever the encoder's dtype (bf16 and fp16 are
    exactly representable in float32; numpy has no bfloat16). ``negative`` is None when CFG is off.
    """

    positive: np.ndarray
    negative: np.ndarray | None


@dataclass(frozen=True)
class Latents:
    """Denoised latents ``[1, latent_frames, C, H/8, W/8]`` as float32, already with CogVideoX1.5's
    front temporal padding removed (``padding_frames`` says how many latent frames were dropped)."""

    latents: np.ndarray
    padding_frames: int = 0


@dataclass(frozen=True)
class ImageLatents:
    """Image-to-video: the input image's latents as `CogVideoXImageToVideoPipeline.prepare_latents` makes them
    (scaled, zero-padded to the video's latent frames, float32 ``[1, latent_frames, C, H/8, W/8]``), and the
    request generator's state after the encoder's sample (`torch.Generator.get_state()` bytes): the denoiser
    draws its noise from there, so the draws happen in the pipeline's order (serve/stages/image_encoding.py)."""

    latents: np.ndarray
    generator_state: bytes


@dataclass(frozen=True)
class StageTiming:
    """Seconds spent by one stage call, recorded into the job's metadata."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class GenerationRequest:
    """One attempt of one job, as every stage sees it."""

    job_id: str
    prompt: str
    negative_prompt: str | None
    params: SamplingParams
    model: str
    attempt: int = 1
    tenant: str | None = None  # whose job: the stage replicas' log lines say it (serve/logcontext.py)


@dataclass(frozen=True)
class Handoff:
    """A stage's output plus what the stages so far did with it, for the metadata record: seconds per
    stage, and how each computed it (`info`, e.g. the denoiser's speed options that served it)."""

    value: object
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    gpus: dict[str, float] = field(default_factory=dict)  # per stage key: GPUs its replica held
