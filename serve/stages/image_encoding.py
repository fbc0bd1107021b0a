"""Image-to-video's first stage call: the input picture -> the image latents the denoiser joins to its noise.

Our copy of what `CogVideoXImageToVideoPipeline.__call__` (diffusers 0.42) does before its loop: the video
processor's default preprocessing (a stretch to the output size, then [-1, 1]), the VAE *encoder*, a sample of
its latent distribution drawn from the request's generator, the image scaling (inverted for CogVideoX 1.5), the
zero padding to the video's latent frame count (plus 1.5's front frame rule), all in the pipeline's order and
dtypes (`prepare_latents`). It runs where the VAE lives, never on the ingress.

diffusers draws from *one* generator: first the encoder's sample (here), then the initial noise and, with the DPM
scheduler, fresh noise every step (the denoiser). So this stage hands on the generator's state with the latents
(`ImageLatents.generator_state`) and the denoiser continues from it: the draws happen in the pipeline's order
although they happen on two replicas.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.stages.types import ImageLatents, SamplingParams


def latent_frame_count(num_frames: int, temporal_factor: int, patch_size_t: int | None) -> tuple[int, int]:
    """(latent frames the model runs on, of which padding frames at the front): the pipeline's step 5. CogVideoX
    1.5 patches `patch_size_t` latent frames at a time, so an odd count is padded."""
    latent_frames = (num_frames - 1) // temporal_factor + 1
    additional = 0
    if patch_size_t is not None and latent_frames % patch_size_t != 0:
        additional = patch_size_t - latent_frames % patch_size_t
    return latent_frames + additional, additional


class ImageEncodingStage:
    """Owns a VAE (its encoder) and the two transformer settings the image latents' layout depends on."""

    def __init__(self, vae, *, latent_channels: int, patch_size_t: int | None, device: str = "cpu",
                 latents_dtype: torch.dtype | None = None) -> None:
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.device = torch.device(device)
        self.latent_channels = latent_channels  # the transformer's in_channels // 2 (noise | image)
        self.patch_size_t = patch_size_t
        # the dtype the pipeline scales and pads the image latents in: its prompt embeddings' (the model's)
        self.latents_dtype = latents_dtype or vae.dtype
        self.vae_scale_factor_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_scale_factor_temporal = vae.config.temporal_compression_ratio
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> ImageEncodingStage:
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", revision=revision, dtype=dtype)
        return cls.sharing(vae.to(device).eval(), path, device=device, dtype=dtype, revision=revision)

    @classmethod
    def sharing(cls, vae, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                revision: str | None = None) -> ImageEncodingStage:
        """On a VAE that is loaded already (the VaeDecoder replica's, `DecodingStage.vae`): one copy of the weights
        serves the encode and the decode."""
        from diffusers import CogVideoXTransformer3DModel

        # the transformer's config (not its weights) says how the image latents are laid out
        config = CogVideoXTransformer3DModel.load_config(path, subfolder="transformer", revision=revision)
        if config["in_channels"] == config["out_channels"]:
            raise ValueError(f"{path} holds a text-to-video CogVideoX transformer (in_channels == out_channels "
                             f"== {config['in_channels']}): it takes no image")
        return cls(vae, latent_channels=config["in_channels"] // 2, patch_size_t=config.get("patch_size_t"),
                   device=device, latents_dtype=dtype)

    @torch.inference_mode()
    def encode(self, image, params: SamplingParams) -> ImageLatents:
        """`image` (an RGB PIL image, any size: stretched to the output's) -> padded image latents
        `[1, latent_frames, C, H/8, W/8]` as float32, and the generator's state after the encoder's draw."""
        from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import (
            retrieve_latents,
        )

        # the pipeline's generator, as `pipe(generator=torch.Generator("cpu").manual_seed(seed))`
        generator = torch.Generator("cpu").manual_seed(params.seed)
        frames, _ = latent_frame_count(params.num_frames, self.vae_scale_factor_temporal, self.patch_size_t)
        dtype = self.latents_dtype
        h = params.height // self.vae_scale_factor_spatial
        w = params.width // self.vae_scale_factor_spatial

        pixels = self.video_processor.preprocess(image, height=params.height, width=params.width)
        pixels = pixels.to(self.device, dtype=dtype).unsqueeze(2)  # [B, C, F=1, H, W]
        # the encoder runs in the VAE's dtype (the same as the model's in a one-dtype pipeline), untiled as in the
        # pipeline, also on a VAE whose decode the replica tiles (tiling would change the encoder's numbers)
        tiled, self.vae.use_tiling = getattr(self.vae, "use_tiling", False), False
        try:
            encoded = [retrieve_latents(self.vae.encode(img.unsqueeze(0).to(self.vae.dtype)), generator)
                       for img in pixels]
        finally:
            self.vae.use_tiling = tiled
        latents = torch.cat(encoded, dim=0).to(dtype).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
        scaling = self.vae.config.scaling_factor
        if not self.vae.config.invert_scale_latents:
            latents = scaling * latents
        else:  # CogVideoX 1.5's VAE: its image latents were trained unscaled
            latents = 1 / scaling * latents
        padding = torch.zeros((1, frames - 1, self.latent_channels, h, w), device=self.device, dtype=dtype)
        latents = torch.cat([latents, padding], dim=1)
        if self.patch_size_t is not None:
            first_frame = latents[:, : latents.size(1) % self.patch_size_t, ...]
            latents = torch.cat([first_frame, latents], dim=1)
        return ImageLatents(latents=latents.float().cpu().numpy(),
                            generator_state=generator.get_state().numpy().tobytes())


def generator_after(image: ImageLatents | None, seed: int) -> torch.Generator:
    """The request's CPU generator: where the image encoder left it, or fresh from `seed` (text-to-video)."""
    generator = torch.Generator("cpu")
    if image is None:
        return generator.manual_seed(seed)
    generator.set_state(torch.from_numpy(np.frombuffer(image.generator_state, dtype=np.uint8).copy()))
    return generator
