"""Benchmark the denoiser's speed options on one GPU, full-size CogVideoX architectures, random weights.

Sits beside the service: it drives the same stages (serve/stages/) and options (serve/config/accel.py, serve/stages/accel.py) that
the replicas run, next to diffusers' own `CogVideoXPipeline` (eager, no offload) as the reference,
in one process on one card, and appends a section with the results to BENCHMARKS.md.

    python benchmarks/gpu_benchmark.py --models 2b,5b --out BENCHMARKS.md        # on the GPU machine
    python benchmarks/gpu_benchmark.py --models 5b-i2v --out BENCHMARKS.md       # image-to-video only
    python benchmarks/gpu_benchmark.py --dry-run --out /tmp/BENCHMARKS.md        # CPU, tiny models

What it measures and what it does not:
- Weights are random (no download): the architectures and shapes are the real ones (configs below,
  copied from THUDM/CogVideoX-2b and -5b and google/t5-v1_1-xxl), so compute and memory are the real
  ones; the videos are noise. Lossy options are compared with the lossless run at the same seed
  (final latents), which says how far they move the numbers, not how a real video looks. Adaptive
  caches (first_block) skip according to how fast activations change, which random weights do not
  reproduce: their speed here is not a prediction for real checkpoints.
- Prompts are tokenized with the tiny offline vocabulary of serve/models/tiny.py and padded to 226
  tokens, as every CogVideoX prompt is: T5 computes exactly as much as with the real tokenizer.
- Each setting runs ONE request with a short schedule of `--steps-warm + --steps-measured` steps;
  the per-step time is taken over the last `--steps-measured` steps, and the 50-step time is that
  mean x 50 (an extrapolation, not a 50-step run). Cache hit patterns of a short schedule differ
  from a 50-step one.
- Image-to-video (`5b-i2v`, row `i2v`): CogVideoX-5b-I2V's architecture at its only size (49x480x720, learned
  positional embeddings: `--frames/--height/--width` do not apply), a random input picture, the stages the
  replicas run (ImageEncodingStage on the VaeDecoder's VAE, DenoisingStage with the image latents,
  DecodingStage) against diffusers' `CogVideoXImageToVideoPipeline` built from the same modules. Image encode and
  decode are timed once each, after one warm-up of each.
- The Enhancer (`--models enhance`, rows `sr_x2`, `sr_x4`, `rife_2x`, planned last): Real-ESRGAN RRDBNet x2plus and
  x4plus at full size (23 blocks, 64 filters; random weights written in the published basicsr `.pth` layout and
  loaded by `SuperResolver.from_pretrained`, spandrel's detection, as the service loads them), untiled, batch 4, on
  a 49x480x720 uint8 clip (x4 also served at 2x: x4 then the antialiased downscale); RIFE 4.25 IFNet at the
  published widths, 2x on the same clip and at 1440x960 (the service runs SR first, then interpolation at the
  delivered size). Dtype: the 5b preset's (bf16, what the Enhancer gets on a GPU; `--enhance-dtype` for others).
  Each run once after a warm-up on 4 frames; seconds, peak GPU memory, and the share of the 5b video's seconds
  (this run's 5b `sdpa` row when measured, else the 5b prior: the table says which). --dry-run: tiny weights
  (serve/models/tiny_enhance.py) on a 9x32x48 clip.

    python benchmarks/gpu_benchmark.py --models enhance --out BENCHMARKS.md      # the Enhancer rows alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.config.accel import AccelConfig  # noqa: E402
from serve.models.tiny import (  # noqa: E402
    _SCHEDULER_BASE,
    TINY_5B_I2V_SIZE,
    _tokenizer_vocab,
    build_tiny_pipeline,
)
from serve.stages.decoding import DecodingStage  # noqa: E402
from serve.stages.denoising import DenoisingStage  # noqa: E402
from serve.stages.image_encoding import ImageEncodingStage  # noqa: E402
from serve.stages.text_encoding import TextEncodingStage  # noqa: E402
from serve.stages.types import (  # noqa: E402
    IMAGE_ENCODE_FRAME_STEPS,
    AccelUnavailable,
    Latents,
    SamplingParams,
)

# 1. The real architectures (config.json of each checkpoint's subfolder; no weights needed)
_TRANSFORMER_COMMON = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-05, "out_channels": 16, "patch_size": 2, "sample_frames": 49,
    "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
}
TRANSFORMER_CONFIGS = {
    "2b": {**_TRANSFORMER_COMMON, "num_attention_heads": 30, "num_layers": 30,
           "use_rotary_positional_embeddings": False},
    "5b": {**_TRANSFORMER_COMMON, "num_attention_heads": 48, "num_layers": 42,
           "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False},
}
# THUDM/CogVideoX-5b-I2V: the 5b transformer taking noise | image latents (32 channels, predicting 16) and adding
# learned positional embeddings (fitted to sample_frames x sample_height x sample_width: 49x480x720 only)
TRANSFORMER_CONFIGS["5b-i2v"] = {**TRANSFORMER_CONFIGS["5b"], "in_channels": 32,
                                 "use_learned_positional_embeddings": True}
_VAE_COMMON = {
    "act_fn": "silu", "block_out_channels": (128, 256, 256, 512), "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_height": 480,
    "sample_width": 720, "shift_factor": None, "temporal_compression_ratio": 4,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}
VAE_CONFIGS = {"2b": {**_VAE_COMMON, "scaling_factor": 1.15258426}, "5b": {**_VAE_COMMON, "scaling_factor": 0.7}}
VAE_CONFIGS["5b-i2v"] = VAE_CONFIGS["5b"]  # CogVideoX-5b-I2V's VAE is the 5b's (it also encodes the image)
# google/t5-v1_1-xxl, encoder only (both models use it)
T5_XXL_CONFIG = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06, "dropout_rate": 0.1, "tie_word_embeddings": False, "is_encoder_decoder": False,
}
# (scheduler class, snr_shift_scale, weights dtype of the preset, dynamic CFG) per model
MODELS = {"2b": ("CogVideoXDDIMScheduler", 3.0, torch.float16, False),
          "5b": ("CogVideoXDPMScheduler", 1.0, torch.bfloat16, True),
          "5b-i2v": ("CogVideoXDPMScheduler", 1.0, torch.bfloat16, True)}  # (serve/presets.py cogvideox-5b-i2v)
# models whose only row is the image-to-video one (no denoiser settings), and their fixed geometry
I2V_MODELS = {"5b-i2v"}
I2V_GEOMETRY = {"5b-i2v": (49, 480, 720)}  # frames, height, width: the learned positional embeddings' size
# The Enhancer's rows (`--models enhance`, a pseudo-model: no CogVideoX components): Real-ESRGAN RRDBNet x2plus / x4plus
# (serve/stages/super_resolution.py, loaded by spandrel from a random checkpoint in the published basicsr layout) and
# RIFE 4.25 IFNet at its published widths (serve/stages/interpolation.py), on the 5b's delivered clip (49x480x720)
ENHANCE_MODELS = {"enhance"}
ENHANCE_GEOMETRY = (49, 480, 720)  # frames, height, width of the decoded clip the Enhancer gets
ENHANCE_DRY_GEOMETRY = (9, 32, 48)  # --dry-run: tiny weights (serve/models/tiny_enhance.py), tiny clip
ENHANCE_WARM_FRAMES = 4  # the warm-up run's frames (one SR batch: the same shapes as the timed run's batches)
ENHANCE_SR_BATCH, ENHANCE_RIFE_BATCH = 4, 8  # SuperResolver's / FrameInterpolator's default batch sizes
RRDB_FILTERS, RRDB_BLOCKS = 64, 23  # RealESRGAN_x2plus / x4plus

# 2. Settings and the plan. `_use_cache` (default: whether a cache is set) says whether the request
# engages the configured cache. The fp8 settings prepare the first-block cache without using it, so
# that `fastest` (the same fp8 replica serving a `quality: "speed"` request) reuses their compiled graphs.
SETTINGS: dict[str, dict | None] = {
    "pipeline": None,  # diffusers CogVideoXPipeline, eager, no offload
    "sdpa": {},
    "cudnn": {"attention_backend": "cudnn"},
    "flash": {"attention_backend": "flash"},
    "compile": {"compile": "regional"},
    "cudnn_compile": {"attention_backend": "cudnn", "compile": "regional"},
    "fp8": {"fp8": True, "compile": "regional", "cache": "first_block", "_use_cache": False},
    "cudnn_fp8": {"attention_backend": "cudnn", "fp8": True, "compile": "regional", "cache": "first_block",
                  "_use_cache": False},
    "fastest": {"fp8": True, "compile": "regional", "cache": "first_block"},
    "cudnn_fastest": {"attention_backend": "cudnn", "fp8": True, "compile": "regional", "cache": "first_block"},
    "first_block": {"cache": "first_block"},
    "pab": {"cache": "pab"},
    "faster": {"cache": "faster"},
}
# Rows that measure a stage rather than a denoiser setting (tables of their own)
PROBES = {"attention": "one SDPA call per kernel at the full sequence vs an fp32 reference",
          "vae": "VAE decode: diffusers' post-processing vs ours on the device, tiled, cudnn.benchmark",
          "i2v": "image-to-video at its native size: image encode, steps, decode vs CogVideoXImageToVideoPipeline",
          "sr_x2": "Enhancer: RRDBNet x2plus (23 blocks, 64 filters) 49x480x720 -> 1440x960, untiled, batch 4",
          "sr_x4": "Enhancer: RRDBNet x4plus 49x480x720 -> 2880x1920, and served at 2x (x4 + antialiased downscale)",
          "rife_2x": "Enhancer: RIFE 4.25 IFNet, published widths, 2x on 49 frames at 720x480 and at 1440x960"}
LOSSY = {"fp8", "cudnn_fp8", "fastest", "cudnn_fastest", "first_block", "pab", "faster"}
# The order of value: if time runs out, what is left out matters least. 5b plain diffusers against this
# project's lossless path (sdpa, cudnn, and cuDNN's deviation at the full sequence), then compile, then
# fp8 + compile, then the fastest path, the VAE once (for the per-video ratios), then the same three with
# cuDNN attention, then 2b, then the eager caches, then image-to-video (its own model, `--models 5b-i2v` alone
# for a call of its own), then the Enhancer's models (`--models enhance` alone for a call of its own). (Rows for
# parallel denoising come here when that stage exists.)
PLAN: list[tuple[str, str]] = [
    ("5b", "pipeline"), ("5b", "sdpa"), ("5b", "cudnn"), ("5b", "attention"),
    ("5b", "compile"), ("5b", "fp8"), ("5b", "fastest"), ("5b", "vae"),
    ("5b", "cudnn_compile"), ("5b", "cudnn_fp8"), ("5b", "cudnn_fastest"),
    ("2b", "pipeline"), ("2b", "sdpa"), ("2b", "cudnn"), ("2b", "compile"), ("2b", "fp8"), ("2b", "fastest"),
    ("5b", "first_block"), ("5b", "pab"), ("5b", "faster"), ("5b", "flash"),
    ("5b-i2v", "i2v"),
    ("enhance", "sr_x2"), ("enhance", "sr_x4"), ("enhance", "rife_2x"),
]
# Priors for the time plan, refined by what the run measures. Step: one CFG step at 49x480x720, eager,
# H200 (FIELD-NOTES); build: random init on the GPU; compile: regional inductor compile of one block
# (a guess until measured; the first compiled row's setup replaces it for the next).
PRIORS = {"5b": {"step_s": 1.76, "build_s": 15.0, "compile_s": 60.0},
          "2b": {"step_s": 0.64, "build_s": 6.0, "compile_s": 45.0}}
# 5b-I2V: the 5b's token count and blocks (only the patch embedding is wider): the 5b's priors, not a measurement
PRIORS["5b-i2v"] = dict(PRIORS["5b"])
T5_BUILD_S, VAE_BUILD_S, T5_ENCODE_S, QUANTIZE_S = 20.0, 3.0, 0.05, 5.0
IMAGE_ENCODE_S = 1.0  # VAE encode of one 480x720 picture: a guess until measured
VAE_UNTILED_S, VAE_TILED_S, CUDNN_AUTOTUNE_S = 2.2, 3.2, 10.0
# The Enhancer rows on a GPU, whole row (random init + checkpoint write + spandrel load, warm-up, timed run(s)): GUESSES
# from FLOP counts (RRDBNet x4plus ~18 G multiply-adds per input pixel, x2plus a quarter of that behind its pixel
# unshuffle; RIFE far less), not measurements; the run's wall s per row says what they really take
ENHANCE_PRIORS_S = {"sr_x2": 8.0, "sr_x4": 25.0, "rife_2x": 15.0}
PROMPT = "A panda playing a guitar in a bamboo forest, cinematic close up shot, golden light"
NEGATIVE = "blurry, low quality"
GiB = 1024**3


class StepStats:
    """Median and mean of the measured step times (`steps`) of a row or an I2V side."""

    steps: list[float]

    @property
    def median(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.steps) if self.steps else None


@dataclass
class Row(StepStats):
    model: str
    setting: str
    status: str = "ok"
    setup_s: float | None = None
    steps: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    dev_max_abs: float | None = None
    dev_rel_l2: float | None = None
    speedup: float | None = None
    t5_s: float | None = None  # prompt encoding of this request (pipeline: its own encode_prompt)
    video_s: float | None = None  # T5 + 50 steps + VAE decode, extrapolated
    video_ratio: float | None = None  # video_s / the pipeline's video_s
    estimate_s: float | None = None  # what the plan expected the row to take
    wall_s: float | None = None  # what it took


@dataclass
class StageTimes:
    t5_s: float | None = None
    resident_gib: float | None = None
    note: str = ""


@dataclass
class VaeTimes:
    """One model's VAE, once (2b and 5b share the architecture): seconds and peak GiB per way of decoding."""
    model: str
    shape: tuple[int, ...] = ()
    rows: list[tuple[str, float | None, float | None, str]] = field(default_factory=list)

    def seconds(self, name: str) -> float | None:
        return next((s for n, s, _, _ in self.rows if n == name), None)


@dataclass
class I2vSide(StepStats):
    """One way of running an image-to-video request: seconds per stage, final latents' deviation."""
    name: str
    status: str = "ok"
    t5_s: float | None = None
    encode_s: float | None = None
    steps: list[float] = field(default_factory=list)
    decode_s: float | None = None
    peak_gib: float | None = None
    dev_max_abs: float | None = None
    dev_rel_l2: float | None = None


    @property
    def video_s(self) -> float | None:
        """T5 + image encode + 50 steps + decode, extrapolated."""
        parts = (self.t5_s, self.encode_s, self.mean, self.decode_s)
        return None if any(p is None for p in parts) else self.t5_s + self.encode_s + 50 * self.mean + self.decode_s


@dataclass
class I2vTimes:
    model: str
    geometry: tuple[int, int, int] = (0, 0, 0)
    sides: list[I2vSide] = field(default_factory=list)  # [diffusers, ours]


@dataclass
class EnhanceRun:
    """One timed Enhancer call: a model on the clip at one size (after one warm-up on a few frames)."""
    row: str  # the plan's row (sr_x2, sr_x4, rife_2x)
    name: str
    status: str = "ok"
    dtype: str = "-"
    frames_in: str = "-"  # FxHxW
    frames_out: str = "-"
    seconds: float | None = None
    peak_gib: float | None = None  # max allocated during the timed run (everything resident included)
    resident_gib: float | None = None  # allocated just before it (this model and whatever else the run holds)
    note: str = ""


@dataclass
class EnhanceTimes:
    rows: list[EnhanceRun] = field(default_factory=list)


@dataclass
class AttentionTimes:
    model: str
    tokens: int = 0
    rows: list[tuple[str, str, float | None, float | None, float | None]] = field(default_factory=list)


# 3. Building the models
@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(model: str, device: torch.device, dry_run: bool):
    """The model's transformer, the same random weights every time (a fresh copy after fp8 replaced them)."""
    dtype = MODELS[model][2]
    if dry_run:
        return build_tiny_pipeline(model).transformer.to(device=device, dtype=dtype)
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(1)
    with torch.device(device), default_dtype(dtype):
        return CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS[model]).to(dtype).eval()


def build_components(model: str, device: torch.device, dry_run: bool, text_encoder=None) -> dict:
    """Random-weight components in the serving dtypes: the transformer and VAE in the preset dtype, T5 in
    bf16 (as the runtime loads it on a GPU), one T5 shared by both models (both checkpoints use T5-XXL).
    Mixed dtypes are the point: the 2b transformer is fp16, its prompt embeddings come from a bf16 T5."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    scheduler_name, snr_shift, dtype, dynamic_cfg = MODELS[model]
    if dry_run:
        pipe = build_tiny_pipeline(model)
        tokenizer, vae = pipe.tokenizer, pipe.vae.to(device=device, dtype=dtype)
        text_encoder = text_encoder or pipe.text_encoder.to(device=device, dtype=torch.bfloat16)
    else:
        tokenizer = T5Tokenizer(vocab=_tokenizer_vocab(), extra_ids=0)
        torch.manual_seed(0)
        with torch.device(device):
            if text_encoder is None:
                with default_dtype(torch.bfloat16):
                    text_encoder = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.bfloat16).eval()
            with default_dtype(dtype):
                vae = AutoencoderKLCogVideoX(**VAE_CONFIGS[model]).to(dtype).eval()
    scheduler_cls = getattr(diffusers, scheduler_name)
    scheduler_config = dict(scheduler_cls(**_SCHEDULER_BASE, snr_shift_scale=snr_shift).config)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder,
            "transformer": build_transformer(model, device, dry_run), "vae": vae, "scheduler_cls": scheduler_cls,
            "scheduler_config": scheduler_config, "dynamic_cfg": dynamic_cfg}


def make_stages(c: dict, device: torch.device) -> dict:
    return {
        "device": device,
        "text": TextEncodingStage(c["tokenizer"], c["text_encoder"], str(device)),
        "denoise": DenoisingStage(c["transformer"], c["scheduler_cls"], c["scheduler_config"], device=str(device)),
        "decode": DecodingStage(c["vae"], str(device)),
        "applied": None,  # the AccelConfig the denoiser runs with now
        "applied_name": None,  # ... and its setting's name
        "quantized": None,  # the AccelConfig whose fp8 replaced the weights (irreversible)
        "quantized_name": None,
    }


# 4. Measuring
class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None


def step_durations(start: float, marks: list[float]) -> list[float]:
    """Seconds of each step from the end-of-step timestamps."""
    return [b - a for a, b in zip([start, *marks[:-1]], marks)]


def deviation(latents: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    if reference is None:
        return None, None
    diff = latents.astype(np.float64) - reference.astype(np.float64)
    norm = float(np.linalg.norm(reference.astype(np.float64)))
    return float(np.abs(diff).max()), float(np.linalg.norm(diff) / norm) if norm else math.inf


def run_pipeline(c: dict, geometry, n_steps: int, seed: int, clock: Clock):
    """diffusers as a user runs it with these components. The prompt is encoded by the pipeline's own
    `encode_prompt` in the transformer's dtype and passed as embeddings: called with `prompt=`, the
    pipeline casts the embeddings (and so the latents) to the T5's dtype, and a fp16 transformer (2b)
    then fails on bf16 inputs. Returns (step seconds, latents, peak GiB, encode seconds)."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                             transformer=c["transformer"],
                             scheduler=c["scheduler_cls"].from_config(c["scheduler_config"]))
    pipe.set_progress_bar_config(disable=True)
    marks: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        marks.append(clock.now())
        return kwargs

    frames, height, width = geometry
    clock.reset_peak()
    t0 = clock.now()
    with torch.inference_mode():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=226,
            device=c["transformer"].device, dtype=c["transformer"].dtype)
    start = clock.now()
    out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_frames=frames,
               height=height, width=width, num_inference_steps=n_steps, guidance_scale=6.0,
               use_dynamic_cfg=c["dynamic_cfg"], generator=torch.Generator("cpu").manual_seed(seed),
               output_type="latent", callback_on_step_end=on_step_end).frames
    return step_durations(start, marks), out.float().cpu().numpy(), clock.peak_gib(), start - t0


def run_stage(st: dict, c: dict, geometry, n_steps: int, seed: int, use_cache: bool, clock: Clock):
    frames, height, width = geometry
    t0 = clock.now()
    emb = st["text"].encode(PROMPT, NEGATIVE, do_cfg=True)
    encode_s = clock.now() - t0
    params = SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=n_steps,
                            guidance_scale=6.0, use_dynamic_cfg=c["dynamic_cfg"], seed=seed, fps=8)
    marks: list[float] = []
    clock.reset_peak()
    start = clock.now()
    latents = st["denoise"].denoise(emb, params, on_step=lambda i, n: marks.append(clock.now()), use_cache=use_cache)
    return step_durations(start, marks), latents.latents, clock.peak_gib(), encode_s


def measure_t5(st: dict, clock: Clock, repeats: int) -> float:
    text = st["text"]
    text.encode(PROMPT, NEGATIVE, do_cfg=True)  # warm
    t5 = []
    for _ in range(repeats):
        t0 = clock.now()
        text.encode(PROMPT, NEGATIVE, do_cfg=True)
        t5.append(clock.now() - t0)
    return statistics.median(t5)


def latent_shape(model: str, geometry, c: dict) -> tuple[int, ...]:
    frames, height, width = geometry
    channels = c["transformer"].config.in_channels
    return (1, (frames - 1) // 4 + 1, channels, height // 8, width // 8)


def measure_vae(model: str, st: dict, c: dict, geometry, clock: Clock) -> VaeTimes:
    """Decode one video's latents several ways, each after a warm-up decode of its own."""
    from serve.stages.decoding import to_uint8

    shape = latent_shape(model, geometry, c)
    z = Latents(latents=np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    times = VaeTimes(model=model, shape=shape)
    vae, device = st["decode"].vae, str(st["device"])

    def timed(name: str, fn, note: str = "", warm: bool = True) -> None:
        try:
            if warm:
                fn()
            clock.reset_peak()
            t0 = clock.now()
            fn()
            times.rows.append((name, clock.now() - t0, clock.peak_gib(), note))
        except Exception as exc:  # one way failing (out of memory) must not lose the others
            times.rows.append((name, None, None, f"error: {type(exc).__name__}: {exc}"[:160].replace("|", "/")))

    untiled = DecodingStage(vae, device)
    timed("diffusers (float frames, uint8 on the host)", lambda: to_uint8(untiled.decode(z)),
          "decode_latents + postprocess_video(np) + to_uint8: what a diffusers user's export does")
    timed("ours (uint8 on the device)", lambda: untiled.decode_uint8(z), "the VaeDecoder replica's path")
    try:
        tiled = DecodingStage(vae, device, enable_tiling=True)
        timed("ours, tiled", lambda: tiled.decode_uint8(z), "spatial tiles: the out-of-memory fallback")
    finally:
        vae.disable_tiling()
    if st["device"].type == "cuda":
        old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            t0 = clock.now()
            untiled.decode_uint8(z)  # pays the algorithm search, as a replica's warm-up would
            search_s = clock.now() - t0
            timed("ours, cudnn.benchmark", lambda: untiled.decode_uint8(z),
                  f"model.vae_cudnn_benchmark; the first decode (search) took {search_s:.2f} s", warm=False)
        finally:
            torch.backends.cudnn.benchmark = old
    return times


def measure_attention(model: str, c: dict, geometry, clock: Clock, device: torch.device) -> AttentionTimes:
    """cuDNN's (and flash's) deviation at the real sequence, which the start-up probe (8 tokens) cannot see:
    one attention call [2, heads, text + video tokens, head_dim] in the model dtype against float32."""
    import torch.nn.functional as F

    from serve.stages.attention import SDPA_BACKENDS, sdpa_kernel

    config = c["transformer"].config
    frames, height, width = geometry
    p = config.patch_size
    tokens = config.max_text_seq_length + ((frames - 1) // 4 + 1) * (height // 8 // p) * (width // 8 // p)
    result = AttentionTimes(model=model, tokens=tokens)
    dtype = c["transformer"].dtype
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2, config.num_attention_heads, tokens, config.attention_head_dim, generator=gen,
                           device=device) for _ in range(3))
    reference_kernel = "efficient" if device.type == "cuda" else "math"  # fp32 math at 17,776 tokens: 120 GB
    with torch.inference_mode(), sdpa_kernel([SDPA_BACKENDS[reference_kernel]]):
        reference = F.scaled_dot_product_attention(q, k, v)
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    for name in ("flash", "cudnn", "efficient"):
        try:
            with torch.inference_mode(), sdpa_kernel([SDPA_BACKENDS[name]]):
                F.scaled_dot_product_attention(qh, kh, vh)  # warm
                t0 = clock.now()
                out = F.scaled_dot_product_attention(qh, kh, vh)
                seconds = clock.now() - t0
            diff = out.float() - reference
            max_abs = float(diff.abs().max())
            rel = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(reference))
            result.rows.append((name, "ok", seconds, max_abs, rel))
        except RuntimeError as exc:
            result.rows.append((name, f"unavailable: {str(exc).splitlines()[0][:120]}".replace("|", "/"),
                                None, None, None))
    del q, k, v, qh, kh, vh, reference
    return result


def i2v_geometry(model: str, dry_run: bool) -> tuple[int, int, int]:
    """The only size the model makes (learned positional embeddings): the tiny model's with --dry-run."""
    if dry_run:
        width, height = TINY_5B_I2V_SIZE
        return 9, height, width  # serve/models/tiny.py: sample_frames 9
    return I2V_GEOMETRY[model]


def measure_i2v(model: str, c: dict, st: dict, args, clock: Clock, device: torch.device) -> I2vTimes:
    """One image-to-video request two ways with the same modules, seed and picture: diffusers'
    `CogVideoXImageToVideoPipeline`, and the replicas' stages (ImageEncodingStage on the VaeDecoder's VAE ->
    DenoisingStage(image=...) -> DecodingStage). Per stage seconds; ours' final latents vs the pipeline's."""
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    from serve.stages.decoding import to_uint8

    geometry = i2v_geometry(model, args.dry_run)
    frames, height, width = geometry
    n_steps = args.steps_warm + args.steps_measured
    result = I2vTimes(model=model, geometry=geometry)
    transformer, vae = c["transformer"], c["vae"]
    dtype = transformer.dtype
    picture = Image.fromarray(np.random.default_rng(args.seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    params = SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=n_steps,
                            guidance_scale=6.0, use_dynamic_cfg=c["dynamic_cfg"], seed=args.seed, fps=8)
    encoder = ImageEncodingStage(vae, latent_channels=transformer.config.in_channels // 2,
                                 patch_size_t=transformer.config.patch_size_t, device=str(device), latents_dtype=dtype)
    decoder: DecodingStage = st["decode"]
    pipe = CogVideoXImageToVideoPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=vae,
                                         transformer=transformer,
                                         scheduler=c["scheduler_cls"].from_config(c["scheduler_config"]))
    pipe.set_progress_bar_config(disable=True)
    # warm-ups (neither side pays the first VAE encode's and decode's one-off costs)
    warm = encoder.encode(picture, params)
    decoder.decode_uint8(Latents(latents=np.zeros((1, warm.latents.shape[1], 16, height // 8, width // 8),
                                                  dtype=np.float32)))
    reference: np.ndarray | None = None

    # 1. diffusers: its encode_prompt, its image preprocessing + prepare_latents (the VAE encode, timed alone as the
    # pipeline runs it before its loop), then the whole call (which encodes the image again) for the step times,
    # then its decode_latents + postprocess_video
    ref = I2vSide("diffusers CogVideoXImageToVideoPipeline")
    result.sides.append(ref)
    try:
        clock.reset_peak()
        t0 = clock.now()
        with torch.inference_mode():
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=226, device=device,
                dtype=dtype)
        ref.t5_s = clock.now() - t0
        with torch.inference_mode():
            t0 = clock.now()
            pixels = pipe.video_processor.preprocess(picture, height=height, width=width).to(device, dtype=dtype)
            pipe.prepare_latents(pixels, 1, transformer.config.in_channels // 2, frames, height, width, dtype, device,
                                 torch.Generator("cpu").manual_seed(args.seed))
            ref.encode_s = clock.now() - t0
        marks: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            marks.append(clock.now())
            return kwargs

        start = clock.now()
        out = pipe(image=picture, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                   num_frames=frames, height=height, width=width, num_inference_steps=n_steps, guidance_scale=6.0,
                   use_dynamic_cfg=c["dynamic_cfg"], generator=torch.Generator("cpu").manual_seed(args.seed),
                   output_type="latent", callback_on_step_end=on_step_end).frames
        ref.steps = step_durations(start, marks)[-args.steps_measured:]
        reference = out.float().cpu().numpy()
        with torch.inference_mode():
            t0 = clock.now()
            to_uint8(pipe.video_processor.postprocess_video(pipe.decode_latents(out), output_type="np"))
            ref.decode_s = clock.now() - t0
        ref.peak_gib = clock.peak_gib()
        del out
    except Exception as exc:  # one side failing (out of memory) must not lose the other
        ref.status = f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]

    # 2. ours: the TextEncoder's, the VaeDecoder's (image encode), the Denoiser's and the VaeDecoder's calls
    ours = I2vSide("ours: ImageEncodingStage + DenoisingStage + DecodingStage")
    result.sides.append(ours)
    try:
        clock.reset_peak()
        t0 = clock.now()
        emb = st["text"].encode(PROMPT, NEGATIVE, do_cfg=True)
        ours.t5_s = clock.now() - t0
        t0 = clock.now()
        image_latents = encoder.encode(picture, params)
        ours.encode_s = clock.now() - t0
        marks = []
        start = clock.now()
        latents = st["denoise"].denoise(emb, params, on_step=lambda i, n: marks.append(clock.now()),
                                        image=image_latents)
        ours.steps = step_durations(start, marks)[-args.steps_measured:]
        t0 = clock.now()
        decoder.decode_uint8(latents)
        ours.decode_s = clock.now() - t0
        ours.peak_gib = clock.peak_gib()
        ours.dev_max_abs, ours.dev_rel_l2 = deviation(latents.latents, reference)
    except Exception as exc:
        ours.status = f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
    return result


def render_i2v(i2v: I2vTimes, args) -> list[str]:
    frames, height, width = i2v.geometry
    ref, ours = (i2v.sides + [None, None])[:2]
    lines = ["", f"Image-to-video ({i2v.model}, its native {frames}x{height}x{width}, CFG batch 2, one request of "
             f"{args.steps_warm + args.steps_measured} steps, step times over the last {args.steps_measured}; image "
             "encode and decode once each after a warm-up; video s = T5 + image encode + 50 steps + decode, "
             "extrapolated; deviation: ours' final latents vs the pipeline's, same seed and picture):", "",
             "| path | status | T5 s | image encode s | s/step median | s/step mean | 50 steps s (extrap.) | decode s "
             "| video s | x diffusers | peak GiB | max abs dev | rel L2 dev | measured step times s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for side in i2v.sides:
        ratio = side.video_s / ref.video_s if side is not ref and side.video_s and ref and ref.video_s else None
        lines.append(
            f"| {side.name} | {side.status} | {fmt(side.t5_s)} | {fmt(side.encode_s)} | {fmt(side.median)} "
            f"| {fmt(side.mean)} | {fmt(side.mean * 50 if side.mean else None, 1)} | {fmt(side.decode_s, 2)} "
            f"| {fmt(side.video_s, 1)} | {fmt(ratio if side is not ref else (1.0 if ref.video_s else None), 2)} "
            f"| {fmt(side.peak_gib, 1)} | {fmt(side.dev_max_abs, sci=True)} | {fmt(side.dev_rel_l2, sci=True)} "
            f"| {' '.join(f'{s:.3f}' for s in side.steps) or '-'} |")
    if ref is not None and ours is not None:
        def ratio(a, b):
            return a / b if a is not None and b else None
        lines.append(
            f"| ours / diffusers | - | {fmt(ratio(ours.t5_s, ref.t5_s), 2)} | {fmt(ratio(ours.encode_s, ref.encode_s), 2)} "
            f"| {fmt(ratio(ours.median, ref.median), 2)} | {fmt(ratio(ours.mean, ref.mean), 2)} "
            f"| {fmt(ratio(ours.mean, ref.mean), 2)} | {fmt(ratio(ours.decode_s, ref.decode_s), 2)} "
            f"| {fmt(ratio(ours.video_s, ref.video_s), 2)} | - | {fmt(ratio(ours.peak_gib, ref.peak_gib), 2)} "
            f"| - | - | - |")
    if ours is not None and ours.encode_s and ours.mean:
        # what the cost ceiling's estimate (serve/stages/types.py IMAGE_ENCODE_FRAME_STEPS) should be: the encode in
        # frame-steps, one frame through one denoising step at the video's size (CFG batch as served)
        frame_steps = ours.encode_s / (ours.mean / frames)
        lines += ["", f"Image encode = {frame_steps:.1f} frame-steps (encode s / (s per step / {frames} frames)); "
                      f"the cost ceiling counts IMAGE_ENCODE_FRAME_STEPS = {IMAGE_ENCODE_FRAME_STEPS}."]
    return lines


def enhance_geometry(dry_run: bool) -> tuple[int, int, int]:
    return ENHANCE_DRY_GEOMETRY if dry_run else ENHANCE_GEOMETRY


def serving_dtype(device: torch.device, requested: str) -> torch.dtype:
    """The dtype the Enhancer runs in: `--enhance-dtype`, by default the 5b preset's weights dtype on a GPU (what
    deployments/enhancer.py passes, serve/stages/loading.py weights_dtype) and float32 on a CPU."""
    if requested != "serving":
        return getattr(torch, requested)
    return MODELS["5b"][2] if device.type == "cuda" else torch.float32


def enhance_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 clip [F, H, W, 3] that pans 1 px per frame: smooth random waves plus a little noise, so that RIFE finds
    no scene cut and interpolates every pair (its compute does not depend on the content otherwise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width + frames].astype(np.float32)
    periods, phases = rng.uniform(24, 96, (3, 2)), rng.uniform(0, 2 * np.pi, (3, 2))
    wide = np.stack([128 + 60 * np.sin(2 * np.pi * x / px + a) + 40 * np.sin(2 * np.pi * y / py + b)
                     for (px, py), (a, b) in zip(periods, phases)], axis=-1)
    wide = np.clip(wide + rng.uniform(-4, 4, wide.shape), 0, 255).astype(np.uint8)
    return np.stack([wide[:, i:i + width] for i in range(frames)])


def write_random_rrdbnet(out_dir: Path, scale: int, seed: int = 0) -> Path:
    """A full-size random Real-ESRGAN RRDBNet (RealESRGAN_x2plus / x4plus: 23 blocks, 64 filters; x2 = the x4
    network behind a pixel unshuffle by 2) saved as the published .pth files are: basicsr key names under
    `params_ema` (serve/models/tiny_enhance.py's key map). Returns the file."""
    from serve.models.tiny_enhance import _esrgan_to_basicsr_keys
    from serve.stages.super_resolution import import_spandrel

    import_spandrel()  # first: spandrel's registry imports torchvision, which the shim stands in for
    from spandrel.architectures.ESRGAN import ESRGAN

    shuffle = 4 // scale
    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3 * shuffle * shuffle, out_nc=3, num_filters=RRDB_FILTERS, num_blocks=RRDB_BLOCKS, scale=4,
                   shuffle_factor=shuffle if shuffle > 1 else None)
    path = Path(out_dir) / f"random-RealESRGAN_x{scale}plus.pth"
    torch.save({"params_ema": _esrgan_to_basicsr_keys(model.state_dict(), num_blocks=RRDB_BLOCKS)}, path)
    return path


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]


def _timed_enhance(run: EnhanceRun, fn, warm_fn, clock: Clock) -> np.ndarray | None:
    """One warm-up call on a few frames, then one timed call (synchronised), peak memory reset before it."""
    try:
        warm_fn()
        clock.reset_peak()
        run.resident_gib = torch.cuda.memory_allocated() / GiB if clock.cuda else None
        t0 = clock.now()
        out = fn()
        run.seconds = clock.now() - t0
        run.peak_gib = clock.peak_gib()
        run.frames_out = "x".join(str(d) for d in out.shape[:3])
        return out
    except Exception as exc:  # out of memory past the tiled fallback, a dtype the kernels lack: say so, go on
        run.status = _error(exc)
        return None


def measure_enhance(setting: str, args, clock: Clock, device: torch.device) -> list[EnhanceRun]:
    """One Enhancer row: its model built as the service builds it (SR: a random checkpoint in the published layout,
    loaded by `SuperResolver.from_pretrained`; RIFE: `FrameInterpolator(IFNet())` at the published widths), then
    each of its runs timed once after a warm-up. --dry-run: the tiny weights of serve/models/tiny_enhance.py."""
    from serve.stages.interpolation import FrameInterpolator, IFNet
    from serve.stages.super_resolution import SuperResolver

    frames, height, width = enhance_geometry(args.dry_run)
    dtype = serving_dtype(device, args.enhance_dtype)
    runs: list[EnhanceRun] = []
    clip = enhance_clip(frames, height, width, args.seed)
    shape_in = f"{frames}x{height}x{width}"
    if setting in ("sr_x2", "sr_x4"):
        scale = 2 if setting == "sr_x2" else 4
        with tempfile.TemporaryDirectory(prefix=f"bench-{setting}-") as tmp:
            build = EnhanceRun(setting, f"RRDBNet x{scale}plus: build", dtype=str(dtype).removeprefix("torch."))
            try:
                t0 = time.monotonic()
                if args.dry_run:
                    from serve.models.tiny_enhance import write_tiny_sr

                    weights = str(write_tiny_sr(tmp, arch="esrgan", scale=scale))
                else:
                    weights = str(write_random_rrdbnet(Path(tmp), scale, seed=args.seed))
                sr = SuperResolver.from_pretrained(weights, device=device, dtype=dtype, tile=None,
                                                   batch_size=ENHANCE_SR_BATCH)
                clock.sync()
                build.seconds = time.monotonic() - t0
            except Exception as exc:
                build.status = _error(exc)
                return [build]
        half, bf16 = sr.descriptor.supports_half, sr.descriptor.supports_bfloat16
        ran = str(sr.dtype).removeprefix("torch.")
        params = sum(p.numel() for p in sr.descriptor.model.parameters()) / 1e6
        build.dtype = ran
        build.note = (f"{sr.architecture} x{sr.scale}, {params:.2f} M parameters{' (tiny)' if args.dry_run else ''}, "
                      f"random weights, loaded by spandrel from {Path(sr.source).name}; descriptor supports_half "
                      f"{half}, supports_bfloat16 {bf16}; asked {str(dtype).removeprefix('torch.')}, ran {ran}"
                      + (f" ({sr.dtype_fallback})" if sr.dtype_fallback else ""))
        runs.append(build)
        factors = [scale] if scale == 2 else [4, 2]
        for factor in factors:
            served = " (x4 model, served at 2x: + antialiased bicubic downscale)" if factor != scale else ""
            run = EnhanceRun(setting, f"RRDBNet x{scale}plus, {factor}x{served}", dtype=ran, frames_in=shape_in)
            runs.append(run)
            before = sr.fallbacks
            _timed_enhance(run, lambda f=factor: sr.upscale(clip, f),
                           lambda f=factor: sr.upscale(clip[:ENHANCE_WARM_FRAMES], f), clock)
            run.note = (f"batch {sr.batch_size}, untiled asked; last_tiled {sr.last_tiled}, fallbacks {sr.fallbacks}"
                        f" (this run's warm-up + timed: {sr.fallbacks - before})"
                        + (f", tiled shapes {sorted(sr.tiled_shapes)} at {sr.fallback_tile} px tiles"
                           if sr.tiled_shapes else ""))
        del sr
    elif setting == "rife_2x":
        build = EnhanceRun(setting, "RIFE 4.25 IFNet: build", dtype=str(dtype).removeprefix("torch."))
        runs.append(build)
        try:
            t0 = time.monotonic()
            if args.dry_run:
                from serve.models.tiny_enhance import write_tiny_rife

                with tempfile.TemporaryDirectory(prefix="bench-rife-") as tmp:
                    rife = FrameInterpolator.from_pretrained(write_tiny_rife(tmp), device=device, dtype=dtype,
                                                             batch_size=ENHANCE_RIFE_BATCH)
            else:
                torch.manual_seed(args.seed)
                rife = FrameInterpolator(IFNet(), device=device, dtype=dtype, batch_size=ENHANCE_RIFE_BATCH)
            clock.sync()
            build.seconds = time.monotonic() - t0
        except Exception as exc:
            build.status = _error(exc)
            return runs
        params = sum(p.numel() for p in rife.model.parameters()) / 1e6
        build.note = (f"block widths {tuple(rife.model.block_widths)}, head {rife.model.head_channels}, "
                      f"{params:.2f} M parameters{' (tiny)' if args.dry_run else ''}, random weights")
        for name, size in (("at the decoded size", 1), ("at the delivered size after 2x SR", 2)):
            big = clip if size == 1 else enhance_clip(frames, height * size, width * size, args.seed)
            run = EnhanceRun(setting, f"RIFE 2x {name}", dtype=build.dtype,
                             frames_in=f"{frames}x{height * size}x{width * size}")
            runs.append(run)
            _timed_enhance(run, lambda b=big: rife.interpolate(b, 2),
                           lambda b=big: rife.interpolate(b[:ENHANCE_WARM_FRAMES], 2), clock)
            run.note = (f"batch {rife.batch_size} pairs, {frames - 1 - len(rife.last_scene_cuts)} frames "
                        f"interpolated, scene cuts {rife.last_scene_cuts or 'none'}")
            del big
        del rife
    else:
        raise ValueError(f"not an Enhancer row: {setting}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def five_b_video_s(rows: list[Row], stage_times: dict[str, StageTimes], vae: VaeTimes | None) -> tuple[float, str]:
    """The whole 5b video's seconds for the Enhancer's share: the default 5b row (`sdpa`, the lossless replica)
    as this run measured it, else its parts with priors filled in, else the priors alone."""
    sdpa = next((r for r in rows if (r.model, r.setting) == ("5b", "sdpa") and r.mean), None)
    if sdpa is not None and sdpa.video_s:
        return sdpa.video_s, "measured in this run: the 5b `sdpa` row's video s (T5 + 50 steps extrap. + decode)"
    if sdpa is not None:
        t5 = stage_times.get("5b", StageTimes()).t5_s or sdpa.t5_s
        decode = vae.seconds("ours (uint8 on the device)") if vae else None
        what = ("5b `sdpa` steps measured in this run, " + ("T5 measured" if t5 is not None else "T5 prior") + ", "
                + ("decode measured" if decode is not None else "decode prior"))
        return (t5 if t5 is not None else T5_ENCODE_S) + 50 * sdpa.mean + (decode or VAE_UNTILED_S), what
    prior = T5_ENCODE_S + 50 * PRIORS["5b"]["step_s"] + VAE_UNTILED_S
    return prior, (f"the 5b prior (no 5b row measured in this run): T5 {T5_ENCODE_S} + 50 x "
                   f"{PRIORS['5b']['step_s']} s/step + decode {VAE_UNTILED_S}")


def render_enhance(enhance: EnhanceTimes, args, video: tuple[float, str]) -> list[str]:
    video_s, source = video
    frames, height, width = enhance_geometry(args.dry_run)
    kind = ("CPU dry run, tiny weights (serve/models/tiny_enhance.py): checks the code path, the numbers mean "
            "nothing" if args.dry_run else "full-size architectures, random weights")
    lines = ["", f"Enhancer ({kind}; a {frames}x{height}x{width} uint8 clip, each run timed once after a warm-up on "
             f"{ENHANCE_WARM_FRAMES} frames, synchronised; uint8 in and out on the host, as the stage runs; peak = max "
             "GPU memory allocated during the timed run, resident = allocated before it (whatever else the run still "
             "holds included); share = s / the 5b video's s):", "",
             f"- 5b video s = {video_s:.1f}: {source}", "",
             "| row | run | status | dtype | frames in | frames out | s | peak GiB | resident GiB | peak - resident "
             "GiB | share of a 5b video | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in enhance.rows:
        extra = r.peak_gib - r.resident_gib if r.peak_gib is not None and r.resident_gib is not None else None
        share = f"{100 * r.seconds / video_s:.1f}%" if r.seconds is not None and video_s and \
            r.frames_in != "-" else "-"
        lines.append(f"| {r.row} | {r.name} | {r.status} | {r.dtype} | {r.frames_in} | {r.frames_out} "
                     f"| {fmt(r.seconds, 2)} | {fmt(r.peak_gib, 1)} | {fmt(r.resident_gib, 1)} | {fmt(extra, 1)} "
                     f"| {share} | {r.note or '-'} |")
    return lines


# 5. The time plan
@dataclass
class Planner:
    """Estimates the seconds of each planned row from priors, refined by what was measured."""
    device_type: str
    n_steps: int
    built: set[str] = field(default_factory=set)
    step_s: dict[str, float] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    applied: dict[str, str | None] = field(default_factory=dict)  # the setting a model's denoiser runs now
    quantized: dict[str, str | None] = field(default_factory=dict)  # the fp8 setting its weights carry

    def step(self, model: str) -> float:
        return self.step_s.get(model, PRIORS[model]["step_s"] if self.device_type == "cuda" else 0.1)

    def estimate(self, model: str, setting: str) -> float:
        gpu = self.device_type == "cuda"
        if model in ENHANCE_MODELS:  # each row builds its own model; nothing of the CogVideoX components
            return ENHANCE_PRIORS_S[setting] if gpu else 1.0
        step, prior = self.step(model), PRIORS[model]
        seconds = 0.0
        if model not in self.built:
            seconds += (prior["build_s"] + VAE_BUILD_S + (T5_BUILD_S if not self.built else 0.0)) if gpu else 1.0
        if setting == "vae":
            return seconds + ((4 * VAE_UNTILED_S + 2 * VAE_TILED_S + CUDNN_AUTOTUNE_S + 2 * VAE_UNTILED_S)
                              if gpu else 1.0)
        if setting == "attention":
            return seconds + (6.0 if gpu else 0.5)
        if setting == "i2v":  # both sides: T5, steps, image encode (+ warm-up), decode (+ warm-up)
            return seconds + ((2 * (self.n_steps * step + T5_ENCODE_S) + 3 * IMAGE_ENCODE_S + 3 * VAE_UNTILED_S)
                              if gpu else 2 * self.n_steps * step + 1.0)
        run = self.n_steps * step + T5_ENCODE_S
        if setting == "pipeline":
            return seconds + run + 1.0
        if setting == "sdpa":
            run += 4 * T5_ENCODE_S
        options = SETTINGS.get(setting) or {}
        if self.applied.get(model) is not None and _same_replica(self.applied[model], setting):
            return seconds + run
        if self.quantized.get(model):
            seconds += prior["build_s"] if gpu else 0.5  # fp8 replaced the weights: a fresh transformer
        if options.get("fp8"):
            seconds += QUANTIZE_S if gpu else 0.0
        if options.get("compile"):
            compile_s = self.compile_s.get(model, prior["compile_s"] if gpu else 2.0)
            seconds += compile_s * (1.2 if options.get("fp8") and model not in self.compile_s else 1.0)
            seconds += 2 * step  # the 2-step warm-up request that compiles
        return seconds + run


def _same_replica(applied: str, setting: str) -> bool:
    """Whether `setting` runs on the replica `applied` left as it is (same config; only the per-request
    cache use differs, as for fp8 -> fastest)."""
    strip = lambda name: {k: v for k, v in (SETTINGS.get(name) or {}).items() if not k.startswith("_")}  # noqa: E731
    return SETTINGS.get(setting) is not None and strip(applied) == strip(setting)


def plan_rows(models: list[str], settings: list[str]) -> list[tuple[str, str]]:
    chosen = [(m, s) for m, s in PLAN if m in models and s in settings]
    # deviations are against `sdpa`, ratios against `pipeline`: keep both wherever a model has rows
    for m in models:
        if any(mm == m and s not in PROBES for mm, s in chosen):
            for needed in ("pipeline", "sdpa"):
                if (m, needed) not in chosen:
                    chosen.insert(0 if needed == "pipeline" else 1, (m, needed))
    order = {row: i for i, row in enumerate(PLAN)}
    return sorted(dict.fromkeys(chosen), key=lambda row: order[row])


def render_plan(rows: list[tuple[str, str]], planner: Planner, budget_s: float, spent_s: float = 0.0,
                title: str = "Planned order") -> str:
    lines = [f"{title} ({planner.device_type} estimates; a row that would end past the budget is skipped):",
             "| # | model | row | est. s | cumulative s | within budget |", "|---|---|---|---|---|---|"]
    sim = Planner(planner.device_type, planner.n_steps, set(planner.built), dict(planner.step_s),
                  dict(planner.compile_s), dict(planner.applied), dict(planner.quantized))
    total = spent_s
    for i, (model, setting) in enumerate(rows, 1):
        est = sim.estimate(model, setting)
        fits = not budget_s or total + est <= budget_s
        if fits:
            total += est
            sim.built.add(model)
            _simulate(sim, model, setting)
        lines.append(f"| {i} | {model} | {setting} | {est:.0f} | {total:.0f} | {'yes' if fits else 'no'} |")
    return "\n".join(lines)


def _simulate(planner: Planner, model: str, setting: str) -> None:
    """What running a row does to the denoiser's state, for the plan's later estimates."""
    if setting in PROBES or setting == "pipeline":
        return
    if planner.applied.get(model) is not None and _same_replica(planner.applied[model], setting):
        return
    options = SETTINGS.get(setting) or {}
    planner.quantized[model] = setting if options.get("fp8") else None
    planner.applied[model] = setting
    if options.get("compile") and model not in planner.compile_s:
        planner.compile_s[model] = planner.compile_s.get(model, PRIORS[model]["compile_s"]
                                                         if planner.device_type == "cuda" else 2.0)


# 6. The report
def fmt(value, digits: int = 3, sci: bool = False) -> str:
    if value is None:
        return "-"
    if sci:
        return "0" if value == 0 else f"{value:.2e}"
    return f"{value:.{digits}f}"


def environment(device: torch.device) -> dict[str, str]:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    for name in ("torchao", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = "not installed"
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["CUDA"] = str(torch.version.cuda)
        env["cuDNN"] = str(torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def render(args, env, geometry, rows: list[Row], stage_times: dict[str, StageTimes], vae: VaeTimes | None,
           attention: AttentionTimes | None, started: str, finished: bool, plan_text: str,
           skipped_probes: list[str], i2v: I2vTimes | None = None, enhance: EnhanceTimes | None = None) -> str:
    frames, height, width = geometry
    kind = "CPU dry run, tiny models: checks the code path, the numbers mean nothing" if args.dry_run else \
        "full-size architectures, random weights"
    lines = [
        f"## Run {started} — {env['card']}{' (dry run)' if args.dry_run else ''}",
        "",
        f"- {kind}; {frames}x{height}x{width}, CFG batch 2, seed {args.seed}",
        "- " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "card"),
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- each setting: one request of {args.steps_warm + args.steps_measured} steps; step times over the last "
        f"{args.steps_measured}; **50-step time = mean x 50, extrapolated**; speed-up = pipeline mean / mean",
        "- video s = T5 + 50 steps + VAE decode (extrapolated; the pipeline with its own encode and diffusers' "
        "decode, ours with the stage's T5 and the device-side decode); x diffusers = video s / the pipeline's",
        "- deviation: final latents vs the `sdpa` run (same seed, same schedule); max |diff| and ||diff|| / ||ref||",
        "- peak = max GPU memory allocated during the request (resident weights included)",
    ]
    if not finished:
        lines.append("- **incomplete: the run was still going or was stopped**")
    lines += ["", "| model | setting | lossy | status | setup s | s/step median | s/step mean | 50 steps s (extrap.) "
              "| speed-up | video s | x diffusers | peak GiB | max abs dev | rel L2 dev | est. s | wall s "
              "| measured step times s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.setting
        lines.append(
            f"| {r.model} | {name} | {'yes' if r.setting in LOSSY else 'no'} | {r.status} | {fmt(r.setup_s, 1)} "
            f"| {fmt(r.median)} | {fmt(r.mean)} | {fmt(r.mean * 50 if r.mean else None, 1)} "
            f"| {fmt(r.speedup, 2)} | {fmt(r.video_s, 1)} | {fmt(r.video_ratio, 2)} | {fmt(r.peak_gib, 1)} "
            f"| {fmt(r.dev_max_abs, sci=True)} | {fmt(r.dev_rel_l2, sci=True)} | {fmt(r.estimate_s, 0)} "
            f"| {fmt(r.wall_s, 0)} | {' '.join(f'{s:.3f}' for s in r.steps) or '-'} |")
    if stage_times:
        lines += ["", "| model | T5 s (2 prompts x 226 tokens) | resident weights GiB | note |", "|---|---|---|---|"]
        for model, t in stage_times.items():
            lines.append(f"| {model} | {fmt(t.t5_s)} | {fmt(t.resident_gib, 1)} | {t.note.strip() or '-'} |")
    if vae is not None:
        lines += ["", f"VAE decode, {vae.model} VAE (2b's is the same architecture), latents {list(vae.shape)}:", "",
                  "| decode | s | peak GiB | note |", "|---|---|---|---|"]
        lines += [f"| {name} | {fmt(s, 2)} | {fmt(peak, 1)} | {note or '-'} |" for name, s, peak, note in vae.rows]
    if attention is not None:
        lines += ["", f"Attention kernels at the full sequence ({attention.model}: {attention.tokens} tokens, CFG "
                  f"batch 2), one call in the model dtype vs float32 ({'efficient' if env.get('CUDA') else 'math'}"
                  " kernel):", "", "| kernel | status | s per call | max abs dev | rel L2 dev |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {status} | {fmt(s, 4)} | {fmt(a, sci=True)} | {fmt(r, sci=True)} |"
                  for name, status, s, a, r in attention.rows]
    if i2v is not None:
        lines += render_i2v(i2v, args)
    if enhance is not None and enhance.rows:
        lines += render_enhance(enhance, args, five_b_video_s(rows, stage_times, vae))
    if skipped_probes:
        lines += ["", "Not measured: " + "; ".join(skipped_probes)]
    lines += ["", "Setup s: applying the setting plus, for compiled settings, one 2-step warm-up request (compilation)"
              "; for any setting after an fp8 one, a fresh transformer (the same random weights) first."
              " `fp8`/`cudnn_fp8` = fp8 + regional compile serving a full-quality request; `fastest`/`cudnn_fastest` ="
              " the same replica, as it is (same compiled graphs, no setup), serving a `quality: speed` request"
              " with the first-block cache: the fastest path. Lossless settings should show deviations at bf16/fp16 rounding level;"
              " `pipeline` vs `sdpa` checks that the stages reproduce diffusers on this card. Random weights: cache"
              " speed-ups (first_block especially) do not predict real checkpoints. est. s / wall s: the time plan's"
              " estimate for the row and what it took (calibrates the next plan).", "", plan_text, ""]
    return "\n".join(lines)


def write_report(path: Path, prior: str, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prior.rstrip() + "\n\n" + section if prior.strip() else section)


# 7. The run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="5b,2b,5b-i2v,enhance", help="comma-separated: 5b,2b,5b-i2v,enhance "
                        "(5b-i2v: the image-to-video row `i2v` only; enhance: the Enhancer's rows sr_x2, sr_x4, "
                        "rife_2x only)")
    rows = [*SETTINGS, *PROBES]
    parser.add_argument("--settings", default=",".join(rows), help=f"comma-separated of {rows}")
    parser.add_argument("--steps-warm", type=int, default=2, help="steps per request not measured (>= 1)")
    parser.add_argument("--steps-measured", type=int, default=4, help="steps per request measured")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budget-s", type=float, default=0, help="skip a row whose estimate would end past this "
                        "many seconds from the start (0: no limit); the table is rewritten after every row")
    parser.add_argument("--plan-only", action="store_true", help="print the planned order and estimates (GPU "
                        "priors) for --budget-s, and exit")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; "
                        "eager with --dry-run)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, tiny geometry: tests this script")
    parser.add_argument("--enhance-dtype", default="serving", choices=["serving", "float16", "bfloat16", "float32"],
                        help="the Enhancer rows' dtype (serving: the 5b preset's, bfloat16, as deployments/enhancer.py "
                        "loads them on a GPU; float32 on a CPU)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    for m in args.models:
        if m not in MODELS and m not in ENHANCE_MODELS:
            parser.error(f"--models takes {sorted(MODELS) + sorted(ENHANCE_MODELS)}, got {m!r}")
    for s in args.settings:
        if s not in rows:
            parser.error(f"--settings takes {rows}, got {s!r}")
    if args.steps_warm < 1 or args.steps_measured < 1:
        parser.error("--steps-warm and --steps-measured must be >= 1")
    if args.dry_run:
        args.frames, args.height, args.width = 9, 32, 48
        args.compile_backend = args.compile_backend or "eager"
    return args


def accel_config(setting: str, st: dict, args) -> tuple[AccelConfig, bool]:
    options = dict(SETTINGS[setting])
    use_cache = options.pop("_use_cache", options.get("cache", "none") != "none")
    overrides = {"compile_backend": args.compile_backend} if args.compile_backend else {}
    if options.get("fp8") and st["denoise"].dtype != torch.bfloat16:
        overrides["fp8_granularity"] = "tensor"  # torchao's per-row scaling needs bf16 (2b runs in fp16)
    return AccelConfig(**options, **overrides), use_cache


def measure_setting(setting: str, model: str, c: dict, st: dict, args, geometry, clock: Clock, row: Row,
                    device: torch.device) -> np.ndarray:
    """Run one request under `setting`; fills the row's timings and returns the final latents."""
    n_steps = args.steps_warm + args.steps_measured
    if setting == "pipeline":
        if st["applied"] is not None or st["quantized"] is not None:  # diffusers runs the stock model
            fresh_transformer(model, c, st, device, args.dry_run)
        steps, latents, row.peak_gib, row.t5_s = run_pipeline(c, geometry, n_steps, args.seed, clock)
        row.steps = steps[-args.steps_measured:]
        return latents
    cfg, use_cache = accel_config(setting, st, args)
    t0 = time.monotonic()
    if st["applied"] == cfg:  # the previous setting's replica, as it is (compiled graphs included)
        row.setup_s = 0.0
    else:
        if st["quantized"] is not None:  # fp8 replaced the weights: a fresh transformer, same random weights
            fresh_transformer(model, c, st, device, args.dry_run)
        st["applied"] = st["applied_name"] = None
        st["denoise"].reset_accel()
        torch._dynamo.reset()  # the previous setting's graphs must not serve (or crowd) this one's
        if cfg.fp8:  # before quantizing: weights half-replaced by a failing quantize_ are not stock either
            st["quantized"], st["quantized_name"] = cfg, setting
        st["denoise"].apply_accel(cfg)
        st["applied"], st["applied_name"] = cfg, setting
        if cfg.compile != "off":
            st["denoise"].warmup([geometry], steps=2)
        row.setup_s = time.monotonic() - t0
    den: DenoisingStage = st["denoise"]
    steps, latents, row.peak_gib, row.t5_s = run_stage(st, c, geometry, n_steps, args.seed, use_cache, clock)
    if use_cache and den.last_cache_used == "none":
        row.status = "ok (cache did not engage)"
    if cfg.compile != "off" and not den.last_run_compiled:
        row.status = "ok (ran eagerly: the compiled graphs did not serve this request)"
    row.steps = steps[-args.steps_measured:]
    return latents


def fresh_transformer(model: str, c: dict, st: dict, device: torch.device, dry_run: bool) -> None:
    """Replace the model's transformer (and denoiser) by a stock one with the same random weights."""
    c["transformer"] = None
    st["denoise"] = None
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    c["transformer"] = build_transformer(model, device, dry_run)
    st["denoise"] = DenoisingStage(c["transformer"], c["scheduler_cls"], c["scheduler_config"], device=str(device))
    st["applied"] = st["applied_name"] = st["quantized"] = st["quantized_name"] = None


def compare(rows: list[Row], latents_of: dict[tuple[str, str], np.ndarray], stage_times: dict[str, StageTimes],
            vae: VaeTimes | None) -> None:
    """Deviation from the model's `sdpa` run, speed-up over its `pipeline` run, and the per-video estimate."""
    pipeline = {r.model: r for r in rows if r.setting == "pipeline" and r.mean}
    ours_vae = vae.seconds("ours (uint8 on the device)") if vae else None
    diffusers_vae = vae.seconds("diffusers (float frames, uint8 on the host)") if vae else None
    for r in rows:
        own, ref = latents_of.get((r.model, r.setting)), latents_of.get((r.model, "sdpa"))
        if own is not None and ref is not None:
            r.dev_max_abs, r.dev_rel_l2 = deviation(own, ref)
        if r.mean and r.model in pipeline:
            r.speedup = pipeline[r.model].mean / r.mean
        if r.mean:
            t5 = r.t5_s if r.setting == "pipeline" else (stage_times.get(r.model, StageTimes()).t5_s or r.t5_s)
            decode = diffusers_vae if r.setting == "pipeline" else ours_vae
            r.video_s = t5 + 50 * r.mean + decode if t5 is not None and decode is not None else None
    for r in rows:
        base = pipeline.get(r.model)
        if r.video_s and base is not None and base.video_s:
            r.video_ratio = r.video_s / base.video_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_steps = args.steps_warm + args.steps_measured
    plan = plan_rows(args.models, args.settings)
    if args.plan_only:
        print(render_plan(plan, Planner("cuda", n_steps), args.budget_s, title="Planned order on a GPU"))
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    clock = Clock(device)
    t_start = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    geometry = (args.frames, args.height, args.width)
    planner = Planner(device.type, n_steps)
    plan_text = render_plan(plan, Planner("cuda", n_steps), args.budget_s,
                            title="Planned order on a GPU, before the run")
    print(plan_text, flush=True)
    if args.dry_run:
        print(render_plan(plan, planner, 0, title="Planned order of this dry run"), flush=True)
    env = environment(device)
    prior = args.out.read_text() if args.out.exists() else ""
    rows: list[Row] = []
    stage_times: dict[str, StageTimes] = {}
    vae: VaeTimes | None = None
    attention: AttentionTimes | None = None
    i2v: I2vTimes | None = None
    enhance = EnhanceTimes()
    comps: dict[str, dict] = {}
    stages: dict[str, dict] = {}
    latents_of: dict[tuple[str, str], np.ndarray] = {}
    skipped_probes: list[str] = []

    def report(finished: bool = False) -> None:
        write_report(args.out, prior, render(args, env, geometry, rows, stage_times, vae, attention, started,
                                             finished, plan_text, skipped_probes, i2v, enhance))

    for model, setting in plan:
        row = Row(model, setting)
        row.estimate_s = planner.estimate(model, setting)
        elapsed = time.monotonic() - t_start
        if args.budget_s and elapsed + row.estimate_s > args.budget_s:
            row.status = f"skipped: time budget ({elapsed:.0f} + est. {row.estimate_s:.0f} > {args.budget_s:.0f} s)"
            print(f"[{model}] {setting}: {row.status}", flush=True)
            if setting in PROBES:
                skipped_probes.append(f"{model} {setting}: {row.status}")
            else:
                rows.append(row)
            report()
            continue
        print(f"[{model}] {setting} (est. {row.estimate_s:.0f} s) ...", flush=True)
        t_row = time.monotonic()
        try:
            if model not in comps and model not in ENHANCE_MODELS:  # built when its first row runs; the full-size models share one T5
                shared_t5 = next(iter(comps.values()))["text_encoder"] if comps else None
                comps[model] = build_components(model, device, args.dry_run, text_encoder=shared_t5)
                stages[model] = make_stages(comps[model], device)
                stage_times[model] = StageTimes(
                    resident_gib=torch.cuda.memory_allocated() / GiB if device.type == "cuda" else None)
                if len(comps) > 1 and device.type == "cuda":  # peaks and resident weights count all models
                    stage_times[model].note += (" resident and peak GiB include the models built before it "
                                                f"({', '.join(m for m in comps if m != model)});")
                planner.built.add(model)
                print(f"[{model}] built in {time.monotonic() - t_row:.1f}s", flush=True)
            c, st = comps.get(model), stages.get(model)
            if model in ENHANCE_MODELS:  # models of their own, built by the row (no CogVideoX components)
                runs = measure_enhance(setting, args, clock, device)
                enhance.rows += runs
                failed = [f"{r.name}: {r.status}" for r in runs if r.status != "ok"]
                if failed:
                    row.status = "; ".join(failed)[:200]
            elif setting == "vae":
                vae = measure_vae(model, st, c, geometry, clock)
            elif setting == "attention":
                attention = measure_attention(model, c, geometry, clock, device)
            elif setting == "i2v":
                i2v = measure_i2v(model, c, st, args, clock, device)
                failed = [f"{side.name}: {side.status}" for side in i2v.sides if side.status != "ok"]
                if failed:
                    row.status = "; ".join(failed)[:200]
            else:
                rows.append(row)
                latents_of[(model, setting)] = measure_setting(setting, model, c, st, args, geometry, clock, row,
                                                               device)
                if setting == "sdpa":
                    stage_times[model].t5_s = measure_t5(st, clock, repeats=3)
                    ref = latents_of[(model, setting)]
                    # random weights can overflow (fp16 2b): say so, as deviations are then meaningless
                    stage_times[model].note += (f" sdpa latents std {float(np.std(ref)):.3g}"
                                                f"{'' if np.isfinite(ref).all() else ', NOT FINITE'};")
        except AccelUnavailable as exc:
            row.status = f"unavailable: {str(exc).split('. ')[0]}".replace("|", "/")[:200]
        except Exception as exc:  # one failing row must not lose the others' results
            row.status = f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.wall_s = time.monotonic() - t_row
        if setting in PROBES and row.status != "ok":  # probes have tables of their own, not rows
            skipped_probes.append(f"{model} {setting}: {row.status}")
        learn(planner, model, setting, row, stages.get(model))
        compare(rows, latents_of, stage_times, vae)
        print(f"[{model}] {setting}: {row.status}; {row.wall_s:.0f} s (est. {row.estimate_s:.0f}); measured steps "
              f"{[round(s, 3) for s in row.steps]}", flush=True)
        report()

    report(finished=True)
    print(render(args, env, geometry, rows, stage_times, vae, attention, started, True, plan_text, skipped_probes,
                 i2v, enhance))
    print(f"total {time.monotonic() - t_start:.0f}s; table written to {args.out}", flush=True)
    return 0


def learn(planner: Planner, model: str, setting: str, row: Row, st: dict | None) -> None:
    """Refine the plan's estimates with what this row measured."""
    if setting in ("pipeline", "sdpa") and row.mean:
        planner.step_s[model] = row.mean
    options = SETTINGS.get(setting) or {}
    if options.get("compile") and row.setup_s and row.status.startswith("ok"):
        planner.compile_s[model] = max(0.0, row.setup_s - 2 * planner.step(model))
    if st is not None:
        planner.applied[model] = st["applied_name"]
        planner.quantized[model] = st["quantized_name"]


if __name__ == "__main__":
    sys.exit(main())
