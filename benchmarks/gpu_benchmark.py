"""Benchmark the denoiser's speed options on one GPU, full-size CogVideoX architectures, random weights.

Sits beside the service: it drives the same stages (serve/stages/) and options (serve/accel.py) that
the replicas run, next to diffusers' own `CogVideoXPipeline` (eager, no offload) as the reference,
in one process on one card, and appends a section with the results to BENCHMARKS.md.

    python benchmarks/gpu_benchmark.py --models 2b,5b --out BENCHMARKS.md        # on the GPU machine
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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.accel import AccelConfig, AccelUnavailable  # noqa: E402
from serve.models.tiny import _SCHEDULER_BASE, _tokenizer_vocab, build_tiny_pipeline  # noqa: E402
from serve.stages.decoding import DecodingStage  # noqa: E402
from serve.stages.denoising import DenoisingStage  # noqa: E402
from serve.stages.text_encoding import TextEncodingStage  # noqa: E402
from serve.stages.types import Latents, SamplingParams  # noqa: E402

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
_VAE_COMMON = {
    "act_fn": "silu", "block_out_channels": (128, 256, 256, 512), "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_height": 480,
    "sample_width": 720, "shift_factor": None, "temporal_compression_ratio": 4,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}
VAE_CONFIGS = {"2b": {**_VAE_COMMON, "scaling_factor": 1.15258426}, "5b": {**_VAE_COMMON, "scaling_factor": 0.7}}
# google/t5-v1_1-xxl, encoder only (both models use it)
T5_XXL_CONFIG = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06, "dropout_rate": 0.1, "tie_word_embeddings": False, "is_encoder_decoder": False,
}
# (scheduler class, snr_shift_scale, weights dtype of the preset, dynamic CFG) per model
MODELS = {"2b": ("CogVideoXDDIMScheduler", 3.0, torch.float16, False),
          "5b": ("CogVideoXDPMScheduler", 1.0, torch.bfloat16, True)}

# 2. Settings. Run in this order: the lossless `sdpa` run is the reference for deviations, and fp8
# replaces the weights (irreversible), so it comes last. `_use_cache` (default: whether a cache is set)
# says whether the request engages the configured cache; `fp8_first_block` is the fastest path, the fp8
# setting's replica serving a `quality: "speed"` request (same config: its compiled graphs are reused).
SETTINGS: dict[str, dict | None] = {
    "pipeline": None,  # diffusers CogVideoXPipeline, eager, no offload
    "sdpa": {},
    "flash": {"attention_backend": "flash"},
    "cudnn": {"attention_backend": "cudnn"},
    "first_block": {"cache": "first_block"},
    "pab": {"cache": "pab"},
    "faster": {"cache": "faster"},
    "compile": {"compile": "regional"},
    "fp8": {"fp8": True, "compile": "regional", "cache": "first_block", "_use_cache": False},
    "fp8_first_block": {"fp8": True, "compile": "regional", "cache": "first_block"},
}
LOSSY = {"fp8", "fp8_first_block", "first_block", "pab", "faster"}
PROMPT = "A panda playing a guitar in a bamboo forest, cinematic close up shot, golden light"
NEGATIVE = "blurry, low quality"
GiB = 1024**3


@dataclass
class Row:
    model: str
    setting: str
    status: str = "ok"
    setup_s: float | None = None
    steps: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    dev_max_abs: float | None = None
    dev_rel_l2: float | None = None
    speedup: float | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.steps) if self.steps else None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.steps) if self.steps else None


@dataclass
class StageTimes:
    t5_s: float | None = None
    vae_untiled_s: float | None = None
    vae_untiled_peak_gib: float | None = None
    vae_tiled_s: float | None = None
    vae_tiled_peak_gib: float | None = None
    resident_gib: float | None = None
    note: str = ""


# 3. Building the models
@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_full(model: str, device: torch.device, text_encoder=None) -> dict:
    """Random-weight full-size components, initialised directly on `device` in the serving dtypes."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    scheduler_name, snr_shift, dtype, dynamic_cfg = MODELS[model]
    torch.manual_seed(0)
    with torch.device(device):
        if text_encoder is None:
            with default_dtype(torch.bfloat16):  # the runtime's T5 dtype on GPU
                text_encoder = T5EncoderModel(T5Config(**T5_XXL_CONFIG)).to(torch.bfloat16).eval()
        with default_dtype(dtype):
            transformer = CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS[model]).to(dtype).eval()
            vae = AutoencoderKLCogVideoX(**VAE_CONFIGS[model]).to(dtype).eval()
    scheduler_cls = getattr(diffusers, scheduler_name)
    scheduler_config = dict(scheduler_cls(**_SCHEDULER_BASE, snr_shift_scale=snr_shift).config)
    return {"tokenizer": T5Tokenizer(vocab=_tokenizer_vocab(), extra_ids=0), "text_encoder": text_encoder,
            "transformer": transformer, "vae": vae, "scheduler_cls": scheduler_cls,
            "scheduler_config": scheduler_config, "dynamic_cfg": dynamic_cfg}


def build_tiny(model: str, device: torch.device) -> dict:
    pipe = build_tiny_pipeline(model)
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder.to(device),
            "transformer": pipe.transformer.to(device), "vae": pipe.vae.to(device),
            "scheduler_cls": type(pipe.scheduler), "scheduler_config": dict(pipe.scheduler.config),
            "dynamic_cfg": MODELS[model][3]}


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


def run_pipeline(c: dict, geometry, n_steps: int, seed: int, clock: Clock) -> tuple[list[float], np.ndarray, float]:
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
    start = clock.now()
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=frames, height=height, width=width,
               num_inference_steps=n_steps, guidance_scale=6.0, use_dynamic_cfg=c["dynamic_cfg"],
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
               callback_on_step_end=on_step_end).frames
    # the first "step" also holds the prompt encoding: it is a warm-up step either way
    return step_durations(start, marks), out.float().cpu().numpy(), clock.peak_gib()


def run_stage(st: dict, c: dict, geometry, n_steps: int, seed: int, use_cache: bool, clock: Clock):
    frames, height, width = geometry
    emb = st["text"].encode(PROMPT, NEGATIVE, do_cfg=True)
    params = SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=n_steps,
                            guidance_scale=6.0, use_dynamic_cfg=c["dynamic_cfg"], seed=seed, fps=8)
    marks: list[float] = []
    clock.reset_peak()
    start = clock.now()
    latents = st["denoise"].denoise(emb, params, on_step=lambda i, n: marks.append(clock.now()), use_cache=use_cache)
    return step_durations(start, marks), latents.latents, clock.peak_gib()


def measure_text_and_vae(st: dict, latents: np.ndarray, clock: Clock, repeats: int) -> StageTimes:
    times = StageTimes()
    text = st["text"]
    text.encode(PROMPT, NEGATIVE, do_cfg=True)  # warm
    t5 = []
    for _ in range(repeats):
        t0 = clock.now()
        text.encode(PROMPT, NEGATIVE, do_cfg=True)
        t5.append(clock.now() - t0)
    times.t5_s = statistics.median(t5)

    vae = st["decode"].vae
    for tiled in (False, True):
        stage = DecodingStage(vae, str(st["device"]), enable_tiling=tiled)
        try:
            stage.decode(Latents(latents=latents))  # warm
            clock.reset_peak()
            t0 = clock.now()
            stage.decode(Latents(latents=latents))
            seconds, peak = clock.now() - t0, clock.peak_gib()
            if tiled:
                times.vae_tiled_s, times.vae_tiled_peak_gib = seconds, peak
            else:
                times.vae_untiled_s, times.vae_untiled_peak_gib = seconds, peak
                if stage.fallbacks:
                    times.note += " untiled decode ran out of memory and fell back to tiles;"
        finally:
            vae.disable_tiling()
    return times


# 5. The report
def fmt(value, digits: int = 3, sci: bool = False) -> str:
    if value is None:
        return "-"
    if sci:
        return "0" if value == 0 else f"{value:.2e}"
    return f"{value:.{digits}f}"


def environment(device: torch.device) -> dict[str, str]:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = "not installed"
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["CUDA"] = str(torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def render(args, env, geometry, rows: list[Row], stage_times: dict[str, StageTimes], started: str,
           finished: bool) -> str:
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
        "- deviation: final latents vs the `sdpa` run (same seed, same schedule); max |diff| and ||diff|| / ||ref||",
        "- peak = max GPU memory allocated during the request (resident weights included)",
    ]
    if not finished:
        lines.append("- **incomplete: the run was still going or was stopped**")
    lines += ["", "| model | setting | lossy | status | setup s | s/step median | s/step mean | 50 steps s (extrap.) "
              "| speed-up | peak GiB | max abs dev | rel L2 dev | measured step times s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.setting} | {'yes' if r.setting in LOSSY else 'no'} | {r.status} | {fmt(r.setup_s, 1)} "
            f"| {fmt(r.median)} | {fmt(r.mean)} | {fmt(r.mean * 50 if r.mean else None, 1)} "
            f"| {fmt(r.speedup, 2)} | {fmt(r.peak_gib, 1)} | {fmt(r.dev_max_abs, sci=True)} "
            f"| {fmt(r.dev_rel_l2, sci=True)} "
            f"| {' '.join(f'{s:.3f}' for s in r.steps) or '-'} |")
    if stage_times:
        lines += ["", "| model | T5 s (2 prompts x 226 tokens) | decode untiled s | peak GiB | decode tiled s "
                  "| peak GiB | resident weights GiB | note |", "|---|---|---|---|---|---|---|---|"]
        for model, t in stage_times.items():
            lines.append(f"| {model} | {fmt(t.t5_s)} | {fmt(t.vae_untiled_s, 2)} | {fmt(t.vae_untiled_peak_gib, 1)} "
                         f"| {fmt(t.vae_tiled_s, 2)} | {fmt(t.vae_tiled_peak_gib, 1)} | {fmt(t.resident_gib, 1)} "
                         f"| {t.note.strip() or '-'} |")
    lines += ["", "Setup s: applying the setting plus, for compiled settings, one 2-step warm-up request (compilation)."
              " `fp8` = fp8 + regional compile serving a full-quality request; `fp8_first_block` = the same replica"
              " (same compiled graphs, no setup) serving a `quality: speed` request with the first-block cache:"
              " the fastest path."
              " Decode: `DecodingStage.decode` (VAE decode + post-processing to float frames on the host), after one"
              " warm-up decode; T5 and decode: the median of 3 runs and one run respectively."
              " Lossless settings should show deviations at bf16/fp16 rounding level; `pipeline` vs `sdpa` checks "
              "that the stages reproduce diffusers on this card. Random weights: cache speed-ups (first_block "
              "especially) do not predict real checkpoints.", ""]
    return "\n".join(lines)


def write_report(path: Path, prior: str, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prior.rstrip() + "\n\n" + section if prior.strip() else section)


# 6. The run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="2b,5b", help="comma-separated: 2b,5b")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated of {list(SETTINGS)}")
    parser.add_argument("--steps-warm", type=int, default=2, help="steps per request not measured (>= 1)")
    parser.add_argument("--steps-measured", type=int, default=4, help="steps per request measured")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budget-s", type=float, default=0, help="skip what would start after this many seconds "
                        "(0: no limit); the table is rewritten after every setting either way")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; "
                        "eager with --dry-run)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, tiny geometry: tests this script")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    for m in args.models:
        if m not in MODELS:
            parser.error(f"--models takes {sorted(MODELS)}, got {m!r}")
    for s in args.settings:
        if s not in SETTINGS:
            parser.error(f"--settings takes {list(SETTINGS)}, got {s!r}")
    if args.steps_warm < 1 or args.steps_measured < 1:
        parser.error("--steps-warm and --steps-measured must be >= 1")
    if args.dry_run:
        args.frames, args.height, args.width = 9, 32, 48
        args.compile_backend = args.compile_backend or "eager"
    return args


def measure_setting(setting: str, c: dict, st: dict, args, geometry, clock: Clock, row: Row) -> np.ndarray:
    """Run one request under `setting`; fills the row's timings and returns the final latents."""
    n_steps = args.steps_warm + args.steps_measured
    if setting == "pipeline":
        steps, latents, row.peak_gib = run_pipeline(c, geometry, n_steps, args.seed, clock)
    else:
        den: DenoisingStage = st["denoise"]
        options = dict(SETTINGS[setting])
        use_cache = options.pop("_use_cache", options.get("cache", "none") != "none")
        overrides = {"compile_backend": args.compile_backend} if args.compile_backend else {}
        if options.get("fp8") and den.dtype != torch.bfloat16:
            overrides["fp8_granularity"] = "tensor"  # torchao's per-row scaling needs bf16 (2b runs in fp16)
        cfg = AccelConfig(**options, **overrides)
        t0 = time.monotonic()
        if st.get("applied") == cfg:  # the previous setting's replica, as it is (compiled graphs included)
            row.setup_s = 0.0
        else:
            st["applied"] = None
            den.reset_accel()  # raises after fp8 (irreversible): such a setting must reuse fp8's config
            den.apply_accel(cfg)
            st["applied"] = cfg
            if cfg.compile != "off":
                den.warmup([geometry], steps=2)
            row.setup_s = time.monotonic() - t0
        steps, latents, row.peak_gib = run_stage(st, c, geometry, n_steps, args.seed, use_cache, clock)
        if use_cache and den.last_cache_used == "none":
            row.status = "ok (cache did not engage)"
        if cfg.compile != "off" and not den.last_run_compiled:
            row.status = "ok (ran eagerly: the warm-up compiled no bucket for this shape)"
    row.steps = steps[-args.steps_measured:]
    return latents


def compare(rows: list[Row], latents_of: dict[tuple[str, str], np.ndarray]) -> None:
    """Deviation from the model's `sdpa` run and speed-up over its `pipeline` run, where both exist."""
    pipeline_mean = {r.model: r.mean for r in rows if r.setting == "pipeline" and r.mean}
    for r in rows:
        own, ref = latents_of.get((r.model, r.setting)), latents_of.get((r.model, "sdpa"))
        if own is not None and ref is not None:
            r.dev_max_abs, r.dev_rel_l2 = deviation(own, ref)
        if r.mean and r.model in pipeline_mean:
            r.speedup = pipeline_mean[r.model] / r.mean


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    clock = Clock(device)
    t_start = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    geometry = (args.frames, args.height, args.width)
    n_steps = args.steps_warm + args.steps_measured
    # `sdpa` is the reference for deviations: run it whenever a lossy setting is asked for
    selected = [s for s in SETTINGS if s in args.settings or (s == "sdpa" and set(args.settings) & LOSSY)]
    env = environment(device)
    prior = args.out.read_text() if args.out.exists() else ""
    rows: list[Row] = []
    stage_times: dict[str, StageTimes] = {}

    def report(finished: bool = False) -> None:
        write_report(args.out, prior, render(args, env, geometry, rows, stage_times, started, finished))

    # 6a. Build every model once; the full-size ones share one T5-XXL (both checkpoints use it).
    comps: dict[str, dict] = {}
    stages: dict[str, dict] = {}
    for model in args.models:
        t0 = time.monotonic()
        if args.dry_run:
            comps[model] = build_tiny(model, device)
        else:
            shared_t5 = next(iter(comps.values()))["text_encoder"] if comps else None
            comps[model] = build_full(model, device, text_encoder=shared_t5)
        c = comps[model]
        stages[model] = {
            "device": device,
            "text": TextEncodingStage(c["tokenizer"], c["text_encoder"], str(device)),
            "denoise": DenoisingStage(c["transformer"], c["scheduler_cls"], c["scheduler_config"], device=str(device)),
            "decode": DecodingStage(c["vae"], str(device)),
        }
        print(f"[{model}] built in {time.monotonic() - t0:.1f}s", flush=True)
    resident = torch.cuda.memory_allocated() / GiB if device.type == "cuda" else None

    # 6b. Settings outer, models inner: if the budget runs out, every model has the cheap settings.
    latents_of: dict[tuple[str, str], np.ndarray] = {}
    for setting in selected:
        for model in args.models:
            row = Row(model, setting)
            rows.append(row)
            done = [r.mean for r in rows if r.model == model and r.setting in ("sdpa", "pipeline") and r.mean]
            step_guess = done[-1] if done else (2.5 if device.type == "cuda" else 0.1)
            reuses = stages[model].get("applied") is not None and (SETTINGS[setting] or {}).get("fp8")
            compile_guess = 90.0 if (SETTINGS[setting] or {}).get("compile") and not reuses and device.type == "cuda" \
                else 0.0
            elapsed = time.monotonic() - t_start
            if args.budget_s and elapsed + (n_steps + 2) * step_guess + compile_guess > args.budget_s:
                row.status = f"skipped: time budget ({elapsed:.0f} of {args.budget_s:.0f} s spent)"
                print(f"[{model}] {setting}: {row.status}", flush=True)
                report()
                continue
            print(f"[{model}] {setting} ...", flush=True)
            try:
                latents_of[(model, setting)] = measure_setting(setting, comps[model], stages[model], args, geometry,
                                                               clock, row)
                if setting == "sdpa":
                    stage_times[model] = measure_text_and_vae(stages[model], latents_of[(model, setting)], clock,
                                                              repeats=3)
                    stage_times[model].resident_gib = resident
                    ref = latents_of[(model, setting)]
                    # random weights can overflow (fp16 2b): say so, as deviations are then meaningless
                    stage_times[model].note += (f" sdpa latents std {float(np.std(ref)):.3g}"
                                                f"{'' if np.isfinite(ref).all() else ', NOT FINITE'};")
            except AccelUnavailable as exc:
                row.status = f"unavailable: {str(exc).split('. ')[0]}".replace("|", "/")[:200]
            except Exception as exc:  # one failing setting must not lose the others' results
                row.status = f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
            finally:
                if setting != "pipeline" and not SETTINGS[setting].get("fp8"):  # fp8 cannot be undone: last
                    stages[model]["denoise"].reset_accel()
                    stages[model]["applied"] = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            compare(rows, latents_of)
            print(f"[{model}] {setting}: {row.status}; measured steps {[round(s, 3) for s in row.steps]}", flush=True)
            report()
        if (SETTINGS[setting] or {}).get("compile") and not (SETTINGS[setting] or {}).get("fp8"):
            torch._dynamo.reset()  # drop this setting's graphs before the next one compiles its own

    report(finished=True)
    print(render(args, env, geometry, rows, stage_times, started, True))
    print(f"total {time.monotonic() - t_start:.0f}s; table written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
