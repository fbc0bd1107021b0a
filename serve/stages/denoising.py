"""Stage 2 of 3: `PromptEmbeddings` + `SamplingParams` -> denoised `Latents`, handed on to the decoder.

Our own copy of the `CogVideoXPipeline.__call__` denoising loop (diffusers 0.42), numerically identical
to it for the same seed, with progress reporting and cancellation between steps. Only the transformer
and the scheduler config are loaded; the scheduler itself is created per request because the DPM
scheduler keeps per-request state and both draw noise from the request's generator. Speed options
(serve/config/accel.py, serve/stages/accel.py) are applied once at load; a step cache engages only for requests that ask for speed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from serve.config.accel import AccelConfig
from serve.stages.accel import (
    AppliedAccel,
    apply_accel,
    cache_engages,
    cache_for_request,
    configure_cuda_backends,
    eager_calls,
    reset_accel,
)
from serve.stages.image_encoding import generator_after, latent_frame_count
from serve.stages.parallel import ParallelContext
from serve.stages.types import ImageLatents, Latents, PromptEmbeddings, SamplingParams

log = logging.getLogger(__name__)


class DenoisingCancelled(Exception):
    """Raised between two steps when the caller's `should_cancel()` says so."""


def prepare_rotary_positional_embeddings(
    transformer_config,
    vae_scale_factor_spatial: int,
    height: int,
    width: int,
    num_frames: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`CogVideoXPipeline._prepare_rotary_positional_embeddings`, taking the transformer config
    instead of a pipeline. `num_frames` counts latent frames (after 1.5's temporal padding)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import (
        get_resize_crop_region_for_grid,
    )

    p = transformer_config.patch_size
    p_t = transformer_config.patch_size_t
    grid_height = height // (vae_scale_factor_spatial * p)
    grid_width = width // (vae_scale_factor_spatial * p)
    base_size_width = transformer_config.sample_width // p
    base_size_height = transformer_config.sample_height // p

    if p_t is None:  # CogVideoX 1.0
        grid_crops_coords = get_resize_crop_region_for_grid((grid_height, grid_width), base_size_width, base_size_height)
        return get_3d_rotary_pos_embed(
            embed_dim=transformer_config.attention_head_dim,
            crops_coords=grid_crops_coords,
            grid_size=(grid_height, grid_width),
            temporal_size=num_frames,
            device=device,
        )
    # CogVideoX 1.5
    return get_3d_rotary_pos_embed(
        embed_dim=transformer_config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_height, grid_width),
        temporal_size=(num_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_size_height, base_size_width),
        device=device,
    )


class DenoisingStage:
    """Owns the transformer of one model and its scheduler config."""

    def __init__(
        self,
        transformer,
        scheduler_cls: type,
        scheduler_config: dict,
        vae_scale_factor_spatial: int = 8,
        vae_scale_factor_temporal: int = 4,
        device: str = "cpu",
        accel: AccelConfig | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        self.transformer = transformer
        # this rank's place among the ranks that denoise one video together (None: one process does it all)
        self.parallel = parallel
        self.scheduler_cls = scheduler_cls
        self.scheduler_config = scheduler_config
        self.vae_scale_factor_spatial = vae_scale_factor_spatial
        self.vae_scale_factor_temporal = vae_scale_factor_temporal
        self.device = torch.device(device)
        self.dtype = transformer.dtype
        # The timestep value of the step in progress (None between requests); PAB and FasterCache
        # read it through their `current_timestep_callback` to decide what to skip.
        self.current_timestep: int | None = None
        # Which cache served the last request ("none" when it ran the exact model).
        self.last_cache_used: str = "none"
        # Compiled shape buckets: (latent shape, model batch) that a warm-up compiled. Under compile, a
        # request runs with torch.compiler's "eager_on_recompile" stance: a bucket runs its compiled
        # graphs, any other shape runs eagerly instead of paying a compile (minutes at full size) that
        # would also hold up every request queued behind it.
        self.compiled_buckets: set[tuple[tuple[int, ...], int]] = set()
        # Requests that ran eagerly under compile because their shape is no warmed-up bucket.
        self.uncompiled_runs = 0
        # Whether the last request ran compiled graphs (None: compile is off).
        self.last_run_compiled: bool | None = None
        self.accel = AppliedAccel(device=str(self.device))
        if self.device.type == "cuda":
            configure_cuda_backends()
        if accel is not None:
            self.apply_accel(accel)
        elif parallel is not None:
            parallel.install(self.transformer)

    def apply_accel(self, accel: AccelConfig) -> AppliedAccel:
        """Apply attention backend, fp8, compile and prepare the step cache (see serve/stages/accel.py)."""
        self.accel = apply_accel(self.transformer, accel, self.device,
                                 current_timestep=lambda: self.current_timestep)
        if self.parallel is not None:  # over the processors the attention backend installed
            self.parallel.install(self.transformer, accel.attention_backend)
        self.compiled_buckets.clear()
        return self.accel

    def join(self, parallel: ParallelContext) -> None:
        """Become one rank of `parallel` (after loading: the model loads before the ranks meet)."""
        self.parallel = parallel
        parallel.install(self.transformer, self.accel.attention_backend)

    def reset_accel(self) -> None:
        """Back to the stock model (all but fp8, which replaced the weights); for benchmarks."""
        reset_accel(self.transformer)
        if self.parallel is not None:
            self.parallel.install(self.transformer)
        self.accel = AppliedAccel(device=str(self.device))
        self.compiled_buckets.clear()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        accel: AccelConfig | None = None,
        parallel: ParallelContext | None = None,
    ) -> DenoisingStage:
        import diffusers
        from diffusers import (
            AutoencoderKLCogVideoX,
            CogVideoXDDIMScheduler,
            CogVideoXTransformer3DModel,
        )

        transformer = CogVideoXTransformer3DModel.from_pretrained(
            path, subfolder="transformer", revision=revision, dtype=dtype
        )
        # Any scheduler class reads scheduler_config.json; `_class_name` says which one it is.
        scheduler_config = CogVideoXDDIMScheduler.load_config(path, subfolder="scheduler", revision=revision)
        scheduler_cls = getattr(diffusers, scheduler_config["_class_name"])
        # Latent geometry comes from the VAE; its config (not its weights) is all we need.
        vae_config = AutoencoderKLCogVideoX.load_config(path, subfolder="vae", revision=revision)
        return cls(
            transformer.to(device).eval(),
            scheduler_cls,
            scheduler_config,
            vae_scale_factor_spatial=2 ** (len(vae_config["block_out_channels"]) - 1),
            vae_scale_factor_temporal=vae_config["temporal_compression_ratio"],
            device=device,
            accel=accel,
            parallel=parallel,
        )

    @property
    def takes_image(self) -> bool:
        """An image-to-video transformer: its input is the noise latents joined with image latents."""
        return self.transformer.config.in_channels != self.transformer.config.out_channels

    @torch.inference_mode()
    def denoise(
        self,
        emb: PromptEmbeddings,
        params: SamplingParams,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        use_cache: bool | None = None,
        compile_new_shape: bool = False,
        image: ImageLatents | None = None,
    ) -> Latents:
        """Run the denoising loop for one request (`CogVideoXImageToVideoPipeline`'s with `image`, the image
        encoder's output, for an image-to-video model).

        `use_cache` engages the configured step cache (lossy); None: when `params.quality` is "speed".
        `compile_new_shape` (warm-up only) lets torch.compile compile graphs for a shape that has none
        yet; otherwise such a shape runs eagerly (see `compiled_buckets`).

        On several ranks (`self.parallel`, serve/stages/parallel.py) every rank calls this with the same request;
        rank 0's `should_cancel` stops all of them before the same step, and each returns the same latents.
        """
        from diffusers import CogVideoXDPMScheduler
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        config = self.transformer.config
        device, dtype = self.device, self.dtype

        # 1. Check inputs (the API validated ranges; these guard the stage contract)
        if params.height % 8 != 0 or params.width % 8 != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by 8 but are {params.height} and {params.width}."
            )
        if self.takes_image != (image is not None):
            raise ValueError("an image-to-video model needs the image latents (ImageEncodingStage.encode)"
                             if self.takes_image else "a text-to-video model takes no image")
        do_cfg = params.do_classifier_free_guidance
        if do_cfg and emb.negative is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings, but `emb.negative` is None.")
        par = self.parallel
        # CFG-parallel: this rank computes one half of the CFG batch, and the halves are gathered after the model
        split_cfg = par is not None and par.splits_cfg(do_cfg)

        # 2. Per-request scheduler and generator: the DPM scheduler carries state across steps and
        # draws noise from the generator at every step, so nothing may be shared between requests.
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        # A CPU generator, as in `pipe(generator=torch.Generator("cpu").manual_seed(seed))`:
        # `randn_tensor` then draws on the CPU and moves to `device`, so a seed gives the same
        # video on any accelerator.
        # Image-to-video: the image encoder drew from it first; carry on where it left off.
        generator = generator_after(image, params.seed)

        # 3. Prompt embeddings, `[negative, positive]` (unconditional first)
        # torch.tensor copies: inputs may be read-only (Ray zero-copy reads, the cached negative).
        prompt_embeds = torch.tensor(emb.positive, device=device, dtype=dtype)
        if do_cfg:
            negative = torch.tensor(emb.negative, device=device, dtype=dtype)
            prompt_embeds = torch.cat([negative, prompt_embeds], dim=0)
        if split_cfg:
            prompt_embeds = par.cfg_half(prompt_embeds)

        # 4. Prepare timesteps (their values once on the host: reading `t.item()` per step would
        # wait for the GPU every step)
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, params.num_inference_steps, device)
        timestep_values = [int(v) for v in timesteps.tolist()]

        # 5. Prepare latents. CogVideoX 1.5 patches 2 latent frames at a time: an odd latent count
        # is made even by sampling extra latent frames, which sit at the front and are dropped
        # after the loop (exactly as the pipeline does, so the seed's noise lines up).
        # (The image-to-video pipeline pads its frame count before `prepare_latents`: the same shape.)
        latent_frames, additional_frames = latent_frame_count(
            params.num_frames, self.vae_scale_factor_temporal, config.patch_size_t)
        shape = (
            1,
            latent_frames,
            config.out_channels if image is not None else config.in_channels,
            params.height // self.vae_scale_factor_spatial,
            params.width // self.vae_scale_factor_spatial,
        )
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        image_latents = None
        if image is not None:
            image_latents = torch.tensor(image.latents, device=device, dtype=dtype)
            if image_latents.shape[1] != latents.shape[1] or image_latents.shape[3:] != latents.shape[3:]:
                raise ValueError(f"image latents {tuple(image_latents.shape)} do not fit the noise latents "
                                 f"{tuple(latents.shape)}")
            if do_cfg:
                image_latents = torch.cat([image_latents] * 2)
        # CogVideoX1.5-I2V's `ofs` embedding, with the value the pipeline passes
        ofs = None if config.ofs_embed_dim is None else latents.new_full((1,), fill_value=2.0)

        # 6. Prepare extra step kwargs (eta=0 for DDIM; both schedulers take the generator)
        step_params = set(inspect.signature(scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_params:
            extra_step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            extra_step_kwargs["generator"] = generator

        # 7. Create rotary embeds if required (5b, 1.5; 2b adds sin-cos positions in the patch embedding)
        image_rotary_emb = None
        if config.use_rotary_positional_embeddings:
            image_rotary_emb = prepare_rotary_positional_embeddings(
                config, self.vae_scale_factor_spatial, params.height, params.width, latents.size(1), device
            )

        # 8. Denoising loop, with the step cache engaged for this request only (if asked for), and
        # under compile with the compiled graphs of this shape bucket or eagerly (never compiling)
        bucket = (tuple(latents.shape), 1 if split_cfg or not do_cfg else 2)
        stance = self._compiled_run(bucket, compile_new_shape)
        if use_cache is None:
            use_cache = params.quality == "speed"
        # (FasterCache derives the unconditional branch from the CFG batch, which CFG-parallel splits)
        use_cache = (use_cache and cache_engages(self.accel.cache, do_cfg)
                     and not (split_cfg and self.accel.cache == "faster"))
        total = len(timesteps)
        old_pred_original_sample = None  # for DPM-solver++
        with stance, cache_for_request(self.transformer, self.accel.cache_config, use_cache) as engaged:
            self.last_cache_used = self.accel.cache if engaged else "none"
            if engaged and par is not None:  # one skip decision for all ranks, or they would part ways
                par.agree_cache_decisions(self.transformer)
            try:
                for i, t in enumerate(timesteps):
                    stop = should_cancel is not None and should_cancel()
                    if par is not None:
                        stop = par.agree(stop)  # rank 0's: every rank stops before the same step
                    if stop:
                        raise DenoisingCancelled(f"cancelled before step {i + 1} of {total}")
                    self.current_timestep = timestep_values[i]

                    latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                    latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                    if image_latents is not None:
                        latent_model_input = torch.cat([latent_model_input, image_latents], dim=2)
                    if split_cfg:
                        latent_model_input = par.cfg_half(latent_model_input)
                    timestep = t.expand(latent_model_input.shape[0])

                    # 8a. Predict the noise (cache_context lets diffusers' cache hooks key their state)
                    with self.transformer.cache_context("cond_uncond"):
                        noise_pred = self.transformer(
                            hidden_states=latent_model_input,
                            encoder_hidden_states=prompt_embeds,
                            timestep=timestep,
                            image_rotary_emb=image_rotary_emb,
                            return_dict=False,
                            **({} if ofs is None else {"ofs": ofs}),
                        )[0]
                    if split_cfg:
                        noise_pred = par.gather_cfg(noise_pred)
                    noise_pred = noise_pred.float()

                    # 8b. Guidance. Dynamic CFG is computed from the timestep *value* over the step
                    # count, verbatim from diffusers (it oscillates; matching upstream matters more).
                    guidance_scale = params.guidance_scale
                    if params.use_dynamic_cfg:
                        progress = (num_inference_steps - timestep_values[i]) / num_inference_steps
                        guidance_scale = 1 + params.guidance_scale * ((1 - math.cos(math.pi * progress**5.0)) / 2)
                    if do_cfg:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

                    # 8c. x_t -> x_t-1
                    if not isinstance(scheduler, CogVideoXDPMScheduler):
                        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    else:
                        latents, old_pred_original_sample = scheduler.step(
                            noise_pred,
                            old_pred_original_sample,
                            t,
                            timesteps[i - 1] if i > 0 else None,
                            latents,
                            **extra_step_kwargs,
                            return_dict=False,
                        )
                    latents = latents.to(dtype)

                    if on_step is not None:
                        on_step(i + 1, total)
            finally:
                self.current_timestep = None
                # Cache hooks (if any) must not carry one request's activations into the next.
                if hasattr(self.transformer, "_reset_stateful_cache"):
                    self.transformer._reset_stateful_cache()

        if compile_new_shape and self.accel.compile != "off":
            self.compiled_buckets.add(bucket)

        # 9. Drop 1.5's front padding, hand over as float32 CPU numpy
        latents = latents[:, additional_frames:]
        return Latents(latents=latents.float().cpu().numpy(), padding_frames=additional_frames)

    def last_run_info(self) -> dict[str, Any]:
        """How the last request was computed (for its metadata record): the speed options that served it."""
        return {"attention_backend": self.accel.attention_backend, "compile": self.accel.compile,
                "compiled": self.last_run_compiled, "fp8": self.accel.fp8, "cache": self.last_cache_used,
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                **({} if self.parallel is None else {"parallel": {"cfg": self.parallel.cfg,
                                                                  "ulysses": self.parallel.ulysses}})}

    @contextlib.contextmanager
    def _compiled_run(self, bucket: tuple[tuple[int, ...], int], compile_new_shape: bool):
        """The torch.compile stance for one request, and the check afterwards that it really ran compiled.

        Outside the warmed-up buckets the request runs eagerly (counted and logged). Inside one, a guard
        may still fail (an input no warm-up had); `eager_on_recompile` then runs that code eagerly too,
        silently: the transformer's eager-call counter (serve.stages.accel.EagerCalls) tells.
        """
        if self.accel.compile == "off":
            self.last_run_compiled = None
            yield
            return
        if compile_new_shape:
            self.last_run_compiled = True
            with torch.compiler.set_stance("default"):
                yield
            return
        self.last_run_compiled = bucket in self.compiled_buckets
        if not self.last_run_compiled:
            self.uncompiled_runs += 1
            log.warning(
                "denoiser: latent shape %s with batch %d is no compiled bucket %s; running it eagerly (slower). "
                "Add its (num_frames, height, width) to accel.warmup_shapes%s to compile it at replica start.",
                bucket[0], bucket[1], sorted(self.compiled_buckets),
                "" if bucket[1] == 2 else " and set accel.warmup_without_cfg")
        counter = eager_calls(self.transformer)
        before = counter.count if counter is not None else 0
        # a bucket's guards may still fail: run that eagerly too, never compile on the request path
        with torch.compiler.set_stance("eager_on_recompile"):
            yield
        if self.last_run_compiled and counter is not None and counter.count > before:
            self.last_run_compiled = False
            self.uncompiled_runs += 1
            log.warning(
                "denoiser: a request of compiled bucket %s (batch %d) failed its graphs' guards and ran %d "
                "compiled calls eagerly (slower); an input differs from the warm-up's (e.g. the prompt's token "
                "count)", bucket[0], bucket[1], counter.count - before)

    def _blank_image(self, params: SamplingParams) -> ImageLatents:
        """Zero image latents of the shape a request of `params` brings (warm-up of an image-to-video model)."""
        config = self.transformer.config
        frames, _ = latent_frame_count(params.num_frames, self.vae_scale_factor_temporal, config.patch_size_t)
        shape = (1, frames, config.in_channels - config.out_channels, params.height // self.vae_scale_factor_spatial,
                 params.width // self.vae_scale_factor_spatial)
        state = torch.Generator("cpu").manual_seed(params.seed).get_state().numpy().tobytes()
        return ImageLatents(latents=np.zeros(shape, dtype=np.float32), generator_state=state)

    def warmup(self, shapes: Sequence[tuple[int, int, int]], steps: int = 2, cfg: bool = True,
               without_cfg: bool = False) -> dict[str, float]:
        """One short request per `(num_frames, height, width)`, so that no real request pays for
        compilation (one graph per shape: a compiled bucket) or first-call kernel selection.

        `cfg` warms the CFG batch of 2 (guidance_scale > 1, the usual request), `without_cfg` the batch
        of 1 (guidance_scale <= 1); each is its own bucket under compile. Returns seconds per run, keyed
        `FxHxW` (`FxHxW/nocfg` for batch 1).
        """
        config = self.transformer.config
        zeros = np.zeros((1, config.max_text_seq_length, config.text_embed_dim), dtype=np.float32)
        seconds = {}
        for num_frames, height, width in shapes:
            for guided in [g for g, on in ((True, cfg), (False, without_cfg)) if on]:
                params = SamplingParams(
                    num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=6.0 if guided else 1.0, use_dynamic_cfg=False, seed=0, fps=8,
                )
                emb = PromptEmbeddings(positive=zeros, negative=zeros if guided else None)
                t0 = time.perf_counter()
                self.denoise(emb, params, use_cache=False, compile_new_shape=True,
                             image=self._blank_image(params) if self.takes_image else None)
                seconds[f"{num_frames}x{height}x{width}{'' if guided else '/nocfg'}"] = time.perf_counter() - t0
        return seconds
