"""Speed options for the denoiser's transformer: attention backend, torch.compile, fp8, step caches.

Sits between the configuration (`AccelConfig`, part of the model's config) and the denoising stage
(serve/stages/denoising.py), which calls `apply_accel` once after loading and `cache_for_request`
around every request. Importing this module does not import torch: the ingress validates the config
without it. Lossless options (attention backend, compile) change no result beyond kernel rounding;
lossy ones (fp8, caches) trade quality for speed, and the caches only engage for requests that ask
for `quality="speed"`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "flash", "cudnn", "efficient", "math"]
CacheKind = Literal["none", "first_block", "pab", "faster"]

# fp8 matmuls (torch._scaled_mm) exist from Ada/Hopper on.
FP8_MIN_CAPABILITY = (8, 9)
_FP8_LINEARS = re.compile(r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")


class AccelUnavailable(RuntimeError):
    """A requested option cannot run on this replica (device, capability or package missing)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    low, high = value
    if low >= high:
        raise ValueError(f"a timestep range is (low, high) with low < high, got {value}")
    return value


class FirstBlockCacheParams(_Strict):
    threshold: float = Field(
        default=0.05, gt=0,
        description="Skip the remaining blocks when the first block's residual changed by less than this "
                    "(mean absolute difference relative to the cached one). Higher: faster, lossier.")


class PyramidAttentionBroadcastParams(_Strict):
    spatial_attention_block_skip_range: int = Field(
        default=2, ge=2, description="Recompute the attention every N-th step; reuse it in between.")
    spatial_attention_timestep_skip_range: tuple[int, int] = Field(
        default=(100, 800), description="Timesteps (exclusive bounds) in which reuse is allowed.")

    _range = field_validator("spatial_attention_timestep_skip_range")(_check_range)


class FasterCacheParams(_Strict):
    spatial_attention_block_skip_range: int = Field(
        default=2, ge=2, description="Recompute the attention every N-th step; extrapolate it in between.")
    spatial_attention_timestep_skip_range: tuple[int, int] = Field(
        default=(-1, 681), description="Timesteps (exclusive bounds) in which attention reuse is allowed.")
    attention_weight: float = Field(
        default=0.3, ge=0, le=1,
        description="Weight of the extrapolation term (diffusers' CogVideoX example uses 0.3).")
    unconditional_batch_skip_range: int = Field(
        default=5, ge=2, description="Compute the unconditional CFG branch every N-th step; derive it otherwise.")
    unconditional_batch_timestep_skip_range: tuple[int, int] = Field(
        default=(-1, 781), description="Timesteps (exclusive bounds) in which the unconditional branch is derived.")

    _ranges = field_validator(
        "spatial_attention_timestep_skip_range", "unconditional_batch_timestep_skip_range")(_check_range)


class AccelConfig(_Strict):
    """`model.accel`: how the denoiser's transformer is sped up on its replica."""

    attention_backend: AttentionBackend = Field(
        default="sdpa",
        description="SDPA kernel for the transformer's attention: 'sdpa' lets PyTorch choose; 'flash', 'cudnn', "
                    "'efficient', 'math' pin one (the replica fails at start if it has no such kernel).")
    compile: Literal["off", "regional", "full"] = Field(
        default="off",
        description="torch.compile with static shapes: 'regional' compiles each transformer block (fast to "
                    "compile, works with the first_block cache), 'full' the whole transformer (no cache).")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="Inductor mode. CUDA graphs are not used: cache hooks change control flow.")
    compile_backend: str = Field(
        default="inductor", description="torch.compile backend; 'eager'/'aot_eager' only check tracing (tests).")
    recompile_limit: int = Field(
        default=32, ge=8,
        description="Compiled graphs kept per code object: one per (shape, CFG on/off) that requests use.")
    fp8: bool = Field(
        default=False,
        description="torchao float8 dynamic activation + weight quantization of the transformer blocks' linear "
                    "layers (lossy; needs torchao and a GPU of compute capability >= 8.9, e.g. H100).")
    fp8_granularity: Literal["row", "tensor"] = Field(
        default="row", description="fp8 scale granularity: per row (more accurate) or per tensor.")
    cache: CacheKind = Field(
        default="none",
        description="Step cache used for requests with quality='speed' (lossy): 'first_block' (adaptive), "
                    "'pab' (pyramid attention broadcast), 'faster' (FasterCache; needs CFG).")
    first_block: FirstBlockCacheParams = Field(
        default_factory=FirstBlockCacheParams, description="Parameters of cache='first_block'.")
    pab: PyramidAttentionBroadcastParams = Field(
        default_factory=PyramidAttentionBroadcastParams, description="Parameters of cache='pab'.")
    faster: FasterCacheParams = Field(default_factory=FasterCacheParams, description="Parameters of cache='faster'.")
    warmup_on_start: bool = Field(
        default=True, description="Run each stage once per warm-up shape when the replica starts.")
    warmup_shapes: list[tuple[int, int, int]] = Field(
        default_factory=list,
        description="(num_frames, height, width) to warm up; empty: the preset's default. With compile on these "
                    "are the shape buckets: each is compiled at replica start, and a request of any other shape "
                    "runs eagerly (slower, counted in videogen_denoise_uncompiled_runs_total) instead of compiling.")
    warmup_without_cfg: bool = Field(
        default=False,
        description="Also warm up (and, with compile on, compile) each shape without CFG (batch 1), for requests "
                    "with guidance_scale <= 1; otherwise those run eagerly under compile.")
    warmup_steps: int = Field(default=2, ge=1, description="Denoising steps per warm-up run.")

    @field_validator("warmup_shapes")
    @classmethod
    def _shapes(cls, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        for frames, height, width in shapes:
            if frames < 1 or height % 8 or width % 8 or height <= 0 or width <= 0:
                raise ValueError(
                    f"warmup_shapes entries are (num_frames >= 1, height, width) with height and width positive "
                    f"multiples of 8, got {(frames, height, width)}")
        return shapes

    @model_validator(mode="after")
    def _compatible(self) -> AccelConfig:
        # Compiled code must not trace into the cache hooks (Python state that changes every step):
        # regional compile compiles the block bodies, which first_block's hooks wrap from outside;
        # pab/faster hook the attention modules inside the blocks, full compile everything.
        if self.compile == "full" and self.cache != "none":
            raise ValueError(f"compile='full' cannot be combined with cache={self.cache!r}; use compile='regional' "
                             "with cache='first_block', or cache='none'")
        if self.compile != "off" and not self.warmup_on_start:
            raise ValueError("compile needs warmup_on_start: true: requests never compile, so shapes are compiled "
                             "by the warm-up at replica start (accel.warmup_shapes), and without it every request "
                             "would run eagerly")
        if self.fp8 and self.compile == "off":
            raise ValueError("fp8 needs compile: 'regional' or 'full': eager fp8 quantizes every activation in "
                             "separate kernels, which can cost more than the fp8 matmuls save; set accel.compile: "
                             "regional (with warmup_on_start) or accel.fp8: false")
        if self.compile == "regional" and self.cache in ("pab", "faster"):
            raise ValueError(f"compile='regional' cannot be combined with cache={self.cache!r} (its hooks sit inside "
                             "the compiled blocks); use cache='first_block' or compile='off'")
        return self


@dataclass(frozen=True)
class AppliedAccel:
    """What `apply_accel` did to one transformer (for logs and metrics) and the cache it prepared."""

    attention_backend: str = "sdpa"
    compile: str = "off"
    fp8: bool = False
    cache: str = "none"
    device: str = "cpu"
    # the diffusers cache config (`enable_cache` argument), or None without a cache
    cache_config: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, object]:
        return {"attention_backend": self.attention_backend, "compile": self.compile, "fp8": self.fp8,
                "cache": self.cache, "device": self.device}


def cache_engages(cache: str, do_cfg: bool) -> bool:
    """Whether a cache can serve a request: FasterCache derives the unconditional branch from the CFG batch."""
    return cache != "none" and (do_cfg or cache != "faster")


def configure_cuda_backends() -> None:
    """Let PyTorch pick every fused SDPA kernel on CUDA (flash, memory-efficient, cuDNN)."""
    import torch

    if not torch.cuda.is_available():
        return
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(True)


def check_fp8_supported(device) -> None:
    """Raise `AccelUnavailable` saying why fp8 cannot run on `device`."""
    import importlib.util

    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AccelUnavailable(f"accel.fp8 needs a CUDA GPU of compute capability >= 8.9 (H100, L40S, RTX 4090), "
                               f"but the denoiser runs on {device}; set accel.fp8: false")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise AccelUnavailable(f"accel.fp8 needs compute capability >= 8.9 but {torch.cuda.get_device_name(device)} "
                               f"has {capability[0]}.{capability[1]}; set accel.fp8: false")
    if importlib.util.find_spec("torchao") is None:
        raise AccelUnavailable("accel.fp8 needs the torchao package (pip install torchao) on the denoiser replica")


def apply_accel(transformer, cfg: AccelConfig, device, *,
                current_timestep: Callable[[], int | None] | None = None) -> AppliedAccel:
    """Apply `cfg` to a loaded CogVideoX transformer in place; returns what was applied.

    Order matters: attention processor, then fp8 (swaps the weights), then compile (traces the result).
    The cache is only prepared here; `cache_for_request` engages it per request. PAB and FasterCache
    skip by timestep, read through `current_timestep` (the denoising loop's current timestep value).
    """
    import torch

    from serve.stages.attention import install_attention_backend

    device = torch.device(device)
    if getattr(transformer, "_videogen_accel", None) is not None:
        raise RuntimeError("acceleration was already applied to this transformer; call reset_accel first")
    if device.type == "cuda":
        configure_cuda_backends()
    if cfg.fp8:
        check_fp8_supported(device)
        if cfg.fp8_granularity == "row" and transformer.dtype != torch.bfloat16:
            raise ValueError(f"accel.fp8_granularity='row' needs bfloat16 weights but the transformer is "
                             f"{transformer.dtype}; set model.dtype: bfloat16 or accel.fp8_granularity: tensor")
    if cfg.cache in ("pab", "faster") and current_timestep is None:
        raise ValueError(f"cache={cfg.cache!r} skips by timestep and needs a `current_timestep` callback")

    # 1. Attention backend (probed first, so a missing kernel fails at start, not on a request)
    install_attention_backend(transformer, cfg.attention_backend)

    # 2. fp8 weights
    if cfg.fp8:
        _quantize_fp8(transformer, cfg.fp8_granularity)

    # 3. Compile
    if cfg.compile != "off":
        _compile(transformer, cfg)

    # 4. Cache (prepared, engaged per request)
    cache_config = build_cache_config(cfg, current_timestep)
    applied = AppliedAccel(attention_backend=cfg.attention_backend, compile=cfg.compile, fp8=cfg.fp8,
                           cache=cfg.cache, device=str(device), cache_config=cache_config)
    transformer._videogen_accel = applied
    logger.info("denoiser acceleration: %s", applied.as_dict())
    return applied


def build_cache_config(cfg: AccelConfig, current_timestep: Callable[[], int | None] | None):
    """The diffusers config for `transformer.enable_cache`, or None for cache='none'."""
    if cfg.cache == "none":
        return None
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if cfg.cache == "first_block":
        return FirstBlockCacheConfig(threshold=cfg.first_block.threshold)
    if cfg.cache == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=cfg.pab.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(cfg.pab.spatial_attention_timestep_skip_range),
            current_timestep_callback=current_timestep,
        )
    # diffusers warns on every apply that FasterCache is experimental; we enable it per request.
    logging.getLogger("diffusers.hooks.faster_cache").setLevel(logging.ERROR)
    weight = cfg.faster.attention_weight
    return FasterCacheConfig(
        spatial_attention_block_skip_range=cfg.faster.spatial_attention_block_skip_range,
        spatial_attention_timestep_skip_range=tuple(cfg.faster.spatial_attention_timestep_skip_range),
        attention_weight_callback=lambda _module: weight,
        unconditional_batch_skip_range=cfg.faster.unconditional_batch_skip_range,
        unconditional_batch_timestep_skip_range=tuple(cfg.faster.unconditional_batch_timestep_skip_range),
        # CogVideoX latents are [B, F, C, H, W]
        tensor_format="BFCHW",
        current_timestep_callback=current_timestep,
    )


@contextmanager
def cache_for_request(transformer, cache_config, enabled: bool) -> Iterator[bool]:
    """Engage `cache_config` on `transformer` for one request; yields whether it engaged.

    diffusers installs cache hooks on the model itself (global to the replica), so they are installed
    here for the request and removed afterwards, with their state reset: no request sees another's
    cached activations, and a request that asks for full quality runs the exact uncached model.
    Not reentrant: one request at a time per transformer (the deployment's lock).
    """
    if getattr(transformer, "is_cache_enabled", False):
        # a request that died between enable and disable must not leak its hooks into this one
        logger.warning("cache hooks were still installed; removing them")
        transformer._reset_stateful_cache()
        transformer.disable_cache()
    if not enabled or cache_config is None:
        yield False
        return
    transformer.enable_cache(cache_config)
    try:
        yield True
    finally:
        transformer._reset_stateful_cache()
        transformer.disable_cache()


def reset_accel(transformer) -> None:
    """Undo the reversible parts of `apply_accel` (attention processor, compile, cache hooks).

    For benchmarks that try settings one after another on the same weights; fp8 swaps the weights
    and cannot be undone.
    """
    from serve.stages.attention import install_attention_backend

    applied: AppliedAccel | None = getattr(transformer, "_videogen_accel", None)
    if applied is not None and applied.fp8:
        raise RuntimeError("fp8 quantization replaced the transformer's weights; reload the model to undo it")
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()
        transformer.disable_cache()
    for block in transformer.transformer_blocks:
        if "forward" in vars(block):  # our compiled forward shadows the class method
            del block.forward
    if "forward" in vars(transformer):
        del transformer.forward
    transformer._videogen_eager_calls = None
    install_attention_backend(transformer, "sdpa")
    transformer._videogen_accel = None


def fp8_linear_filter(module, fqn: str) -> bool:
    """Which of a CogVideoX transformer's modules fp8 quantizes: the blocks' attention and feed-forward
    linears, nearly all of the FLOPs. Embeddings, the timestep modulations (2 rows each) and the output
    projection stay in the preset dtype. _scaled_mm wants both dimensions divisible by 16."""
    import torch

    return (isinstance(module, torch.nn.Linear) and _FP8_LINEARS.fullmatch(fqn) is not None
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def fp8_quantization_config(granularity: str):
    """torchao's float8 dynamic-activation + weight config for `granularity` ('row' or 'tensor').

    `set_inductor_config=False`: by default torchao switches on process-wide inductor options at
    quantization time (coordinate-descent tuning among them), which multiplies every later compile's
    time in this process, the warm-up's included; the replica's compile settings stay ours.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    return Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if granularity == "row" else PerTensor(), set_inductor_config=False)


def _quantize_fp8(transformer, granularity: str) -> None:
    from torchao.quantization import quantize_

    quantize_(transformer, fp8_quantization_config(granularity), filter_fn=fp8_linear_filter)


class EagerCalls:
    """Counts calls of compiled code that ran eagerly instead (a guard miss under `eager_on_recompile`,
    or the recompile limit reached). The count sits behind `torch.compiler.is_compiling()`, which dynamo
    traces as True: the compiled graphs never touch it, only an eager run of the same code does. Dynamo's
    own counters (unique graphs, recompiles) do not move when a stance runs a frame eagerly."""

    def __init__(self) -> None:
        self.count = 0

    def mark(self) -> None:
        import torch

        if not torch.compiler.is_compiling():
            self.count += 1


def eager_calls(transformer) -> EagerCalls | None:
    """The transformer's `EagerCalls`, or None when it is not compiled."""
    return getattr(transformer, "_videogen_eager_calls", None)


def _marked(forward, counter: EagerCalls):
    def forward_marked(*args, **kwargs):
        counter.mark()
        return forward(*args, **kwargs)

    return forward_marked


def _compile(transformer, cfg: AccelConfig) -> None:
    import torch

    dynamo_config = torch._dynamo.config
    # named `cache_size_limit` before torch 2.6
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), cfg.recompile_limit))

    options: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": cfg.compile_backend}
    if cfg.compile_backend == "inductor":
        options["mode"] = cfg.compile_mode
    counter = EagerCalls()
    transformer._videogen_eager_calls = counter
    if cfg.compile == "full":
        # the whole forward in one graph; like the regional blocks', an instance attribute shadowing the
        # class method, so that an eager run of it passes the counter
        transformer.forward = torch.compile(_marked(transformer.forward, counter), **options)
        return
    # Regional: compile each block's forward, not the module's __call__, so cache hooks (which
    # replace `block.forward` and keep the previous one as the original) run eagerly around the
    # compiled body instead of being traced into it. Identical blocks share one compiled graph.
    for block in transformer.transformer_blocks:
        block.forward = torch.compile(_marked(block.forward, counter), **options)
