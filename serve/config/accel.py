"""`model.accel` config section: how the denoiser's transformer is sped up on its replica (a leaf, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.config.base import Strict

AttentionBackend = Literal["sdpa", "flash", "cudnn", "efficient", "math"]
CacheKind = Literal["none", "first_block", "pab", "faster"]


def _check_range(value: tuple[int, int]) -> tuple[int, int]:
    low, high = value
    if low >= high:
        raise ValueError(f"a timestep range is (low, high) with low < high, got {value}")
    return value


class FirstBlockCacheParams(Strict):
    threshold: float = Field(
        default=0.05, gt=0,
        description="Skip the remaining blocks when the first block's residual changed by less than this "
                    "(mean absolute difference relative to the cached one). Higher: faster, lossier.")


class PyramidAttentionBroadcastParams(Strict):
    spatial_attention_block_skip_range: int = Field(
        default=2, ge=2, description="Recompute the attention every N-th step; reuse it in between.")
    spatial_attention_timestep_skip_range: tuple[int, int] = Field(
        default=(100, 800), description="Timesteps (exclusive bounds) in which reuse is allowed.")

    _range = field_validator("spatial_attention_timestep_skip_range")(_check_range)


class FasterCacheParams(Strict):
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


class AccelConfig(Strict):
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

