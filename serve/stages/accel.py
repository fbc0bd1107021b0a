"""Speed options for the denoiser's transformer: attention backend, torch.compile, fp8, step caches.

Sits between the configuration (`serve.config.accel.AccelConfig`) and the denoising stage
(serve/stages/denoising.py), which calls `apply_accel` once after loading and `cache_for_request` around every
request. Lossless options (attention backend, compile) change no result beyond kernel rounding; lossy ones (fp8,
caches) trade quality for speed, and the caches only engage for requests that ask for `quality="speed"`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from serve.config.accel import AccelConfig
from serve.stages.types import AccelUnavailable

logger = logging.getLogger(__name__)

# fp8 matmuls (torch._scaled_mm) exist from Ada/Hopper on.
FP8_MIN_CAPABILITY = (8, 9)
_FP8_LINEARS = re.compile(r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))")



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
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
    )

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
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
    )

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
