"""Stage 3 of 3: denoised `Latents` -> RGB frames, handed on to `serve.media` for MP4/JPEG encoding.

Reproduces `CogVideoXPipeline.decode_latents` followed by
`VideoProcessor.postprocess_video(output_type="np")`: undo the VAE scaling, decode, map [-1, 1] to
[0, 1]. Only the VAE is loaded.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.stages.types import Latents


class DecodingStage:
    """Owns the VAE of one model."""

    def __init__(self, vae, device: str = "cpu", enable_tiling: bool = False) -> None:
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.device = torch.device(device)
        if enable_tiling:
            # Decodes in overlapping spatial tiles: slower, but a fraction of the peak memory.
            vae.enable_tiling()
        self.video_processor = VideoProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        enable_tiling: bool = False,
    ) -> DecodingStage:
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", revision=revision, dtype=dtype)
        return cls(vae.to(device).eval(), device, enable_tiling=enable_tiling)

    @torch.inference_mode()
    def decode(self, latents: Latents) -> np.ndarray:
        """Float32 frames `[F, H, W, 3]` in [0, 1]."""
        # torch.tensor copies: Ray hands over read-only zero-copy arrays.
        z = torch.tensor(latents.latents, device=self.device, dtype=self.vae.dtype)
        z = z.permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        # `1 / s * z` rather than `z / s`, in the VAE dtype, as the pipeline computes it: the two
        # round differently.
        z = 1 / self.vae.config.scaling_factor * z
        video = self.vae.decode(z).sample
        frames = self.video_processor.postprocess_video(video=video, output_type="np")
        return frames[0].astype(np.float32, copy=False)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] float frames -> uint8, rounding like diffusers' `numpy_to_pil`."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
