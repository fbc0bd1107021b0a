"""Stage 3 of 3: denoised `Latents` -> RGB frames, handed on to `serve.media` for MP4/JPEG encoding.

Reproduces `CogVideoXPipeline.decode_latents` followed by
`VideoProcessor.postprocess_video(output_type="np")`: undo the VAE scaling, decode, map [-1, 1] to
[0, 1]. The replica's path (`decode_uint8`) also converts to the uint8 frames the encoder takes on the
device, bit for bit as `to_uint8` does on the host, and copies only those. Only the VAE is loaded. An untiled decode that runs out of GPU memory is retried in tiles
(a fraction of the peak memory, slower) and reported, and that shape is decoded in tiles from then on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from serve.stages.types import Latents

logger = logging.getLogger(__name__)

# Called with the latent shape `(B, F, C, H, W)` and the error when a decode falls back to tiles.
FallbackCallback = Callable[[tuple[int, ...], BaseException], None]


class DecodingStage:
    """Owns the VAE of one model (or anything with the VAE's `decode`, `config`, `dtype` and tiling switches)."""

    def __init__(
        self,
        vae,
        device: str = "cpu",
        enable_tiling: bool = False,
        on_fallback: FallbackCallback | None = None,
        cudnn_benchmark: bool = False,
    ) -> None:
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.device = torch.device(device)
        if cudnn_benchmark and self.device.type == "cuda":
            # cuDNN times the Conv3d algorithms once per new input shape (the warm-up's, when it runs)
            # and keeps the fastest. Process-wide: this replica runs only the VAE.
            torch.backends.cudnn.benchmark = True
        self.cudnn_benchmark = bool(torch.backends.cudnn.benchmark) if self.device.type == "cuda" else False
        self.tiling = enable_tiling
        if enable_tiling:
            # Decodes in overlapping spatial tiles: slower, but a fraction of the peak memory.
            vae.enable_tiling()
        self.on_fallback = on_fallback
        # Whether the last decode ran in tiles (configured or after running out of memory).
        self.last_decode_tiled = False
        # Latent shapes whose untiled decode ran out of memory: decoded in tiles straight away.
        self.tiled_shapes: set[tuple[int, ...]] = set()
        self.fallbacks = 0
        self.video_processor = VideoProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        enable_tiling: bool = False,
        on_fallback: FallbackCallback | None = None,
        cudnn_benchmark: bool = False,
    ) -> DecodingStage:
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", revision=revision, dtype=dtype)
        return cls(vae.to(device).eval(), device, enable_tiling=enable_tiling, on_fallback=on_fallback,
                   cudnn_benchmark=cudnn_benchmark)

    @torch.inference_mode()
    def decode(self, latents: Latents, on_fallback: FallbackCallback | None = None) -> np.ndarray:
        """Float32 frames `[F, H, W, 3]` in [0, 1], as diffusers' pipeline returns them (`output_type="np"`).

        If the untiled decode raises `torch.OutOfMemoryError`, the cache is emptied and the decode
        retried in tiles; `on_fallback` (this call's, else the stage's) is told, `last_decode_tiled`
        is set, and later decodes of the same latent shape go straight to tiles.
        """
        video = self._decode_video(latents, on_fallback)
        frames = self.video_processor.postprocess_video(video=video, output_type="np")
        return frames[0].astype(np.float32, copy=False)

    @torch.inference_mode()
    def decode_uint8(self, latents: Latents, on_fallback: FallbackCallback | None = None) -> np.ndarray:
        """uint8 frames `[F, H, W, 3]`: `to_uint8(self.decode(latents))`, bit for bit, computed on the device.

        On a GPU the device-to-host copy is half the bytes of the bf16 frames (a quarter of float32's), and
        the host's numpy passes (cast, clip, scale, round) are gone: the replica's CPUs stay free for encoding.
        """
        video = self._decode_video(latents, on_fallback)
        # diffusers' denormalisation ((x * 0.5 + 0.5).clamp(0, 1), in the VAE dtype), then
        # `to_uint8`'s float32 arithmetic; torch.round and numpy round half to even alike
        frames = self.video_processor.postprocess_video(video=video, output_type="pt")[0]  # [F, C, H, W]
        frames = frames.permute(0, 2, 3, 1).float()
        return (frames.clamp(0.0, 1.0) * 255).round().to(torch.uint8).cpu().numpy()

    def _decode_video(self, latents: Latents, on_fallback: FallbackCallback | None) -> torch.Tensor:
        """The VAE's output `[B, C, F, H, W]` on the device, with the out-of-memory fallback to tiles."""
        shape = tuple(latents.latents.shape)
        tiled = self.tiling or shape in self.tiled_shapes
        oom: torch.OutOfMemoryError | None = None
        try:
            video = self._decode(latents, tiled)
        except torch.OutOfMemoryError as exc:
            if tiled:
                raise
            oom = exc.with_traceback(None)  # the traceback's frames hold the failed attempt's tensors
        if oom is not None:
            # Retried outside the `except` block, once the failed attempt's tensors are freed.
            video = self._decode_after_oom(latents, shape, oom, on_fallback or self.on_fallback)
            tiled = True
        self.last_decode_tiled = tiled
        return video

    def _decode(self, latents: Latents, tiled: bool) -> torch.Tensor:
        # torch.tensor copies: Ray hands over read-only zero-copy arrays.
        z = torch.tensor(latents.latents, device=self.device, dtype=self.vae.dtype)
        z = z.permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        # `1 / s * z` rather than `z / s`, in the VAE dtype, as the pipeline computes it: the two
        # round differently.
        z = 1 / self.vae.config.scaling_factor * z
        if tiled == self.tiling:
            return self.vae.decode(z).sample
        self.vae.enable_tiling()
        try:
            return self.vae.decode(z).sample
        finally:
            self.vae.disable_tiling()

    def _decode_after_oom(self, latents: Latents, shape: tuple[int, ...], error: torch.OutOfMemoryError,
                          on_fallback: FallbackCallback | None) -> torch.Tensor:
        self.fallbacks += 1
        self.tiled_shapes.add(shape)
        logger.warning("VAE decode of latents %s ran out of memory; retrying in tiles (%s)", shape,
                       str(error).splitlines()[0] if str(error) else "OutOfMemoryError")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if on_fallback is not None:
            on_fallback(shape, error)
        return self._decode(latents, tiled=True)

    def warmup(self, shapes: Sequence[tuple[int, int, int]]) -> dict[str, float]:
        """Decode zeros once per `(num_frames, height, width)`: first-call kernel selection (and an
        out-of-memory fallback, if the untiled decode does not fit) happen before real requests."""
        config = self.vae.config
        temporal = config.temporal_compression_ratio
        spatial = 2 ** (len(config.block_out_channels) - 1)
        seconds = {}
        for num_frames, height, width in shapes:
            z = np.zeros((1, (num_frames - 1) // temporal + 1, config.latent_channels, height // spatial,
                          width // spatial), dtype=np.float32)
            t0 = time.perf_counter()
            self.decode_uint8(Latents(latents=z))
            seconds[f"{num_frames}x{height}x{width}"] = time.perf_counter() - t0
        return seconds


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] float frames -> uint8, rounding like diffusers' `numpy_to_pil`."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
