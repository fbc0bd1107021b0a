"""Typed values that cross stage boundaries (TextEncoder [+ the VaeDecoder's image encode] -> Denoiser -> VaeDecoder).

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
# "stretch": the pipeline's resize (the numerics contract); "crop", "pad": aspect kept (outside it)
ImageFit = Literal["stretch", "crop", "pad"]


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
    image_fit: ImageFit = "stretch"  # image-to-video: how the image meets the output size (the VaeDecoder's encode)
    # the Enhancer's work after the VAE (1: none): height and width x sr_factor, fps x fps_factor
    sr_factor: int = 1
    fps_factor: int = 1
    sr_model: str | None = None  # "sr" or "sr_fast": which of the model's SR weights (model.enhance)

    @property
    def enhanced(self) -> bool:
        """The chain ends in the Enhancer (which encodes and uploads), not in the VaeDecoder."""
        return self.sr_factor > 1 or self.fps_factor > 1

    @property
    def delivered(self) -> tuple[int, int, int, int]:
        """(num_frames, height, width, fps) of the video the client gets."""
        return (self.fps_factor * (self.num_frames - 1) + 1, self.height * self.sr_factor,
                self.width * self.sr_factor, self.fps * self.fps_factor)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0


# The VAE encode of one input image, in the cost's unit (one frame through one denoising step at the same size).
# An estimate, to be replaced by what the GPU benchmark's image-to-video row measures (image encode seconds over
# denoise seconds per frame-step): the CogVideoX VAE encoder at 720x480 does roughly the work of a few frame-steps of
# the 5B DiT. It is what the per-request ceiling counts; usage bills the encode's measured seconds.
IMAGE_ENCODE_FRAME_STEPS = 4


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
    image_input: bool = Field(default=False, description="Image-to-video: generated from an input image.")
    image_fit: str = Field(default="stretch", description="Image-to-video: 'stretch', 'crop' or 'pad'.")
    # width, height, num_frames and fps above are what the stages generate; the Enhancer multiplies them
    sr_factor: int = Field(default=1, ge=1, description="Super-resolution factor after the VAE (1: none).")
    fps_factor: int = Field(default=1, ge=1, description="Frame interpolation factor after the VAE (1: none).")
    sr_model: str | None = Field(default=None, description="'sr' or 'sr_fast' (quality: speed) when sr_factor > 1.")

    @property
    def sampling(self) -> SamplingParams:
        """What the denoiser and decoder need of it."""
        return SamplingParams(
            num_frames=self.num_frames, height=self.height, width=self.width,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            use_dynamic_cfg=self.use_dynamic_cfg, seed=self.seed, fps=self.fps,
            quality="speed" if self.quality == "speed" else "quality",
            image_fit=self.image_fit if self.image_fit in ("crop", "pad") else "stretch",
            sr_factor=self.sr_factor, fps_factor=self.fps_factor, sr_model=self.sr_model)

    @property
    def delivered_frames(self) -> int:
        return self.fps_factor * (self.num_frames - 1) + 1

    @property
    def delivered_width(self) -> int:
        return self.width * self.sr_factor

    @property
    def delivered_height(self) -> int:
        return self.height * self.sr_factor

    @property
    def delivered_fps(self) -> int:
        return self.fps * self.fps_factor

    @property
    def cost(self) -> int:
        """frames x width x height x steps, how much DiT work it asks for, plus an image-to-video job's VAE encode
        counted as IMAGE_ENCODE_FRAME_STEPS frame-steps at the video's size, plus an enhanced job's output pixels
        and frames (plans cap the sum)."""
        return self.denoise_cost + self.image_encode_cost + self.enhance_cost

    @property
    def enhance_cost(self) -> int:
        """An enhanced video's delivered frames x width x height (each output pixel of each frame counts once):
        zero for a video delivered as generated."""
        if self.sr_factor == 1 and self.fps_factor == 1:
            return 0
        return self.delivered_frames * self.delivered_width * self.delivered_height

    @property
    def denoise_cost(self) -> int:
        return self.num_frames * self.width * self.height * self.num_inference_steps

    @property
    def image_encode_cost(self) -> int:
        return IMAGE_ENCODE_FRAME_STEPS * self.width * self.height if self.image_input else 0


class InputImage(BaseModel):
    """An image-to-video job's accepted input image, as its job record keeps it: where its bytes are stored (the
    client's original bytes, `serve/media/images.py`) and what identifies them. Never the image itself: the record,
    the metadata JSON and every log line carry this, and only the VAE replica reads the bytes (by `key`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    key: str = Field(description="S3 key of the stored bytes (beside the job's video: same prefix, same lifetime).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the bytes the client sent.")
    size_bytes: int = Field(ge=1)
    media_type: str = Field(description="image/png, image/jpeg or image/webp (sniffed from the bytes).")
    width: int = Field(ge=1, description="Upright width (EXIF orientation applied), before the stretch to the video.")
    height: int = Field(ge=1)
    source: str = Field(default="upload", description="How it came: upload, data_url, base64 or url.")

    def summary(self) -> dict[str, object]:
        """What the metadata JSON records of it: the hash and size, not the image or where it is."""
        return {"sha256": self.sha256, "bytes": self.size_bytes, "media_type": self.media_type,
                "width": self.width, "height": self.height, "source": self.source}


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
    image: InputImage | None = None  # image-to-video: the stored input image the VAE replica encodes


@dataclass(frozen=True)
class Handoff:
    """A stage's output plus what the stages so far did with it, for the metadata record: seconds per
    stage, and how each computed it (`info`, e.g. the denoiser's speed options that served it)."""

    value: object
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    gpus: dict[str, float] = field(default_factory=dict)  # per stage key: GPUs its replica held
