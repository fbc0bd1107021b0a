"""The pipeline's stages, named once: deployment name, config key, timing key, progress phase; and their errors.

Every other module spells a stage through these objects (`DENOISER.deployment`, `DENOISER.key`, ...). Stage
replicas raise the typed errors below (serve/stages/errors are plain-argument exceptions, so they pickle
across Ray and keep their type inside Ray's task errors), and the job runner classifies a failed attempt by
type, never by message text. No torch, no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    deployment: str  # Ray Serve deployment name, inside each model's application `model-<name>`
    key: str  # config section (`deployments.<key>`), usage billing and metadata key
    phase: str  # the job's progress phase while this stage works on it

    @property
    def timing_key(self) -> str:
        """Seconds this stage spent on a job, in its timings and metadata."""
        return f"{self.key}_s"


TEXT_ENCODER = Stage("TextEncoder", "text_encoder", "encoding")
DENOISER = Stage("Denoiser", "denoiser", "denoising")
VAE_DECODER = Stage("VaeDecoder", "vae_decoder", "decoding")
STAGES: tuple[Stage, ...] = (TEXT_ENCODER, DENOISER, VAE_DECODER)
# Super-resolution and frame interpolation after the VAE, deployed only for models with `enhance`
# (`stages_for`); a chain whose request asks for neither never calls it: the VaeDecoder uploads instead.
ENHANCER = Stage("Enhancer", "enhancer", "enhancing")
ALL_STAGES: tuple[Stage, ...] = (*STAGES, ENHANCER)
# Image-to-video's extra stage call: the VAE *encoder* on the input image. It runs on the VaeDecoder deployment,
# which holds the VAE already (a deployment of its own would load the same weights a second time and keep a GPU
# for a call that is a small fraction of the decode). Its own key: its seconds are timed, billed and shown apart.
IMAGE_ENCODER = Stage(VAE_DECODER.deployment, "image_encoder", TEXT_ENCODER.phase)
# Every stage call a job is billed for, in chain order (the image encode only for image-to-video jobs).
BILLED_STAGES: tuple[Stage, ...] = (TEXT_ENCODER, IMAGE_ENCODER, DENOISER, VAE_DECODER, ENHANCER)
# A job's phases in order: waiting, one per stage, then the upload (by the VaeDecoder, or the Enhancer).
QUEUED, UPLOADING = "queued", "uploading"
PHASES: tuple[str, ...] = (QUEUED, *(s.phase for s in ALL_STAGES), UPLOADING)


def stages_for(enhanced: bool) -> tuple[Stage, ...]:
    """The deployments of a model's application: the three, and the Enhancer for a model with `enhance`."""
    return ALL_STAGES if enhanced else STAGES


class StageError(Exception):
    """A stage call did not produce its result. `message` is client-safe (no addresses, ids or tracebacks)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(stage, message)
        self.stage = stage  # the Stage's deployment name
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"


class StageFailed(StageError):
    """The stage's own code raised; `message` names the exception type. Another attempt may succeed."""


class StageUnavailable(StageError):
    """The replica running the call died or could not be reached. Another attempt goes to another replica."""


class StageRefused(StageError):
    """The request itself is invalid for this model (e.g. a shape the checkpoint cannot take): never retried."""


async def first_failed(calls: Sequence[tuple[Stage, Awaitable[object]]], wait_s: float = 0.5) -> Stage | None:
    """The first stage, in chain order, whose call raised within `wait_s`; None if none did. A call still
    running (an upstream stage computing while a downstream replica died) counts as not failed: it is not
    waited for. Cancellation of the caller propagates."""
    for stage, call in calls:
        try:
            await asyncio.wait_for(call, wait_s)
        except asyncio.TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - which one raised is all we ask
            return stage
    return None
