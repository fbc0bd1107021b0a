"""`model.parallel` config section: one video's denoising split across several devices (a leaf, no torch).

A Denoiser replica with `cfg * ulysses` > 1 spans that many GPUs (serve/stages/parallel.py, deployments/denoiser.py):
`cfg: 2` runs the conditional and the unconditional CFG branch on different ranks, `ulysses: U` splits the
attention heads across U ranks (sequence parallelism: every other layer works on 1/U of the video tokens). Both
combine: `{cfg: 2, ulysses: 2}` is 4 ranks. The results are the one-device stage's to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve.config.base import Strict

# attention heads of the real checkpoints per family (transformer/config.json `num_attention_heads`): they bound
# the Ulysses degree, which must divide them
FAMILY_HEADS = {"cogvideox-2b": 30, "cogvideox-5b": 48, "cogvideox1.5-5b": 48, "cogvideox-5b-i2v": 48,
                "cogvideox1.5-5b-i2v": 48}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ParallelConfig(Strict):
    """`model.parallel`: how many devices one Denoiser replica spans, and how the work is split across them."""

    cfg: Literal[1, 2] = Field(
        default=1,
        description="2: the conditional and unconditional classifier-free-guidance branches run on different "
                    "ranks and are combined after an exchange (requests without guidance, guidance_scale <= 1, "
                    "then compute the same branch twice).")
    ulysses: int = Field(
        default=1, ge=1, le=32,
        description="Ulysses sequence-parallel degree: attention heads are split across this many ranks, with an "
                    "all-to-all around each attention over the joint text+video sequence. Must divide the "
                    "transformer's attention heads (30 for CogVideoX-2b, 48 for the 5b models).")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed backend: 'auto' is NCCL on GPU, gloo on CPU.")
    collective_timeout_s: float = Field(
        default=120.0, gt=0, le=3600,
        description="A collective that has not completed after this long fails (the rank that waits gives up, the "
                    "replica reports unhealthy and the job is retried): nothing hangs on a dead rank. Above the "
                    "slowest step, warm-up included.")
    start_timeout_s: float = Field(
        default=900.0, gt=0,
        description="How long the replica waits for its worker ranks to load the model and join the group.")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @model_validator(mode="after")
    def _bounded(self) -> ParallelConfig:
        if self.world_size > 32:
            raise ValueError(f"model.parallel: cfg * ulysses = {self.world_size} ranks; at most 32")
        return self


def check_heads(parallel: ParallelConfig, heads: int, what: str) -> None:
    """Raise ValueError when `heads` attention heads (of `what`) cannot be split `parallel.ulysses` ways."""
    if heads % parallel.ulysses:
        fits = [d for d in divisors(heads) if d > 1]
        raise ValueError(f"model.parallel.ulysses={parallel.ulysses} does not divide the {heads} attention heads of "
                         f"{what}; use one of {fits}, or ulysses: 1")


def source_heads(source: str) -> int | None:
    """The attention heads of a local checkpoint directory (diffusers layout), or None for a remote source."""
    config = Path(source) / "transformer" / "config.json"
    if "://" in source or not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["num_attention_heads"])
    except (ValueError, KeyError, TypeError):
        return None


def check_parallel(parallel: ParallelConfig, family: str, source: str, *, cache: str, compile: str) -> None:
    """Config-time checks of `model.parallel` against the model (its heads: from a local checkpoint's config,
    else the family's real checkpoint) and the speed options it is combined with."""
    if not parallel.enabled:
        return
    local = source_heads(source)
    if local is not None:
        check_heads(parallel, local, f"the checkpoint at {source}")
    else:
        check_heads(parallel, FAMILY_HEADS[family], f"the {family} transformer")
    if parallel.cfg > 1 and cache == "faster":
        raise ValueError("model.parallel.cfg=2 cannot be combined with accel.cache='faster': FasterCache derives the "
                         "unconditional branch from the CFG batch, which CFG-parallel splits across ranks; use "
                         "cache 'first_block' or 'pab', or parallel.cfg: 1")
    if parallel.ulysses > 1 and compile != "off":
        raise ValueError("model.parallel.ulysses > 1 cannot be combined with accel.compile yet: the all-to-all "
                         "inside each attention is not traced into compiled blocks; set accel.compile: off (or use "
                         "parallel.cfg, whose exchange is outside the transformer)")
