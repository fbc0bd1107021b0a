"""The Enhancer's stage: decoded uint8 frames -> super-resolution (serve/stages/super_resolution.py) and/or frame
interpolation (serve/stages/interpolation.py) -> the delivered frames.

Built from a model's `enhance` section: its SR weights (and the lighter `sr_fast` ones, for `quality: speed`) and
its RIFE weights, each resolved from a Hugging Face id, a directory or an s3:// prefix like the other weights. SR
runs first, then interpolation at the delivered size. `last_run_info()` says what served the last call (for the
metadata record). No Ray here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from serve.config.enhance import EnhanceConfig

Resolve = Callable[[str, "str | None"], str]  # (source, revision) -> a local file or directory


class EnhancingStage:
    def __init__(self, sr: dict[str, Any], interpolator: Any | None, sources: dict[str, str] | None = None) -> None:
        self.sr = sr  # "sr" / "sr_fast" -> SuperResolver
        self.interpolator = interpolator
        self.sources = dict(sources or {})  # "sr" / "sr_fast" / "interpolation" -> the configured source
        self._last: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: EnhanceConfig, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    resolve: Resolve = lambda source, revision: source) -> EnhancingStage:
        from serve.stages.interpolation import FrameInterpolator
        from serve.stages.super_resolution import SuperResolver

        sr = {}
        for name, weights in (("sr", cfg.sr), ("sr_fast", cfg.sr_fast)):
            if weights is None:
                continue
            model = SuperResolver.from_pretrained(resolve(weights.source, weights.revision), device=device,
                                                  dtype=dtype, tile=cfg.tile, batch_size=cfg.batch_size)
            if model.scale != weights.scale:
                raise ValueError(f"model.enhance.{name}: {weights.source} is a x{model.scale} model, the config says "
                                 f"scale {weights.scale}")
            sr[name] = model
        interpolator = None
        if cfg.interpolation is not None:
            kwargs = {} if cfg.scene_cut_threshold is None else {"scene_cut_threshold": cfg.scene_cut_threshold}
            interpolator = FrameInterpolator.from_pretrained(
                resolve(cfg.interpolation.source, cfg.interpolation.revision), device=device, dtype=dtype,
                batch_size=cfg.batch_size, **kwargs)
        sources = {name: w.source for name, w in (("sr", cfg.sr), ("sr_fast", cfg.sr_fast),
                                                   ("interpolation", cfg.interpolation)) if w is not None}
        return cls(sr, interpolator, sources)

    def enhance(self, frames: np.ndarray, *, sr_factor: int = 1, fps_factor: int = 1,
                sr_model: str = "sr") -> np.ndarray:
        """uint8 `[F, H, W, 3]` -> uint8 `[fps_factor (F-1) + 1, H sr_factor, W sr_factor, 3]`."""
        info: dict[str, Any] = {"input": {"frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                                          "width": int(frames.shape[2]), "bytes": int(frames.nbytes)}}
        if sr_factor > 1:
            model = self.sr.get(sr_model) or self.sr.get("sr")
            if model is None:
                raise ValueError(f"a {sr_factor}x upscale was asked of a model without super-resolution weights")
            started = time.perf_counter()
            frames = model.upscale(frames, sr_factor)
            used = sr_model if sr_model in self.sr else "sr"
            info["super_resolution"] = {"factor": sr_factor, "weights": used, "source": self.sources.get(used),
                                        "architecture": model.architecture, "scale": model.scale,
                                        "tiled": bool(model.last_tiled), "dtype": str(model.dtype).removeprefix(
                                            "torch."), "seconds": round(time.perf_counter() - started, 4)}
        if fps_factor > 1:
            if self.interpolator is None:
                raise ValueError(f"a {fps_factor}x frame interpolation was asked of a model without RIFE weights")
            started = time.perf_counter()
            frames = self.interpolator.interpolate(frames, fps_factor)
            info["interpolation"] = {"factor": fps_factor, "architecture": "RIFE IFNet (Practical-RIFE 4.25 layout)",
                                     "source": self.sources.get("interpolation"),
                                     "scene_cuts": list(self.interpolator.last_scene_cuts),
                                     "seconds": round(time.perf_counter() - started, 4)}
        info["output"] = {"frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                          "width": int(frames.shape[2])}
        self._last = info
        return frames

    def last_run_info(self) -> dict[str, Any]:
        return dict(self._last)
