"""The Enhancer's stage (serve/stages/enhancing.py): built from a model's `enhance` section through the same loaders
as real weights; super-resolution first, then interpolation at the delivered size."""

from __future__ import annotations

import numpy as np
import pytest

from serve.config.enhance import EnhanceConfig
from serve.models.tiny_enhance import write_tiny_rife, write_tiny_sr
from serve.stages.enhancing import EnhancingStage
from serve.stages.interpolation import FrameInterpolator
from serve.stages.super_resolution import SuperResolver


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhance")
    return {"sr2": write_tiny_sr(root / "sr2", scale=2), "sr4": write_tiny_sr(root / "sr4", scale=4),
            "fast": write_tiny_sr(root / "fast", arch="compact", scale=2), "rife": write_tiny_rife(root / "rife")}


def frames(n: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    ramp = np.linspace(0, 200, w, dtype=np.float32)[None, None, :, None]
    moving = [np.roll(ramp, 2 * i, axis=2) + np.zeros((1, h, w, 3), np.float32) for i in range(n)]
    return np.concatenate(moving).astype(np.uint8)


def test_sr_then_interpolation_equals_the_two_models_applied_in_that_order(weights):
    cfg = EnhanceConfig(sr={"source": str(weights["sr2"]), "scale": 2}, interpolation={"source": str(weights["rife"])})
    stage = EnhancingStage.from_config(cfg)
    src = frames()
    out = stage.enhance(src, sr_factor=2, fps_factor=2)
    assert out.shape == (9, 64, 96, 3) and out.dtype == np.uint8
    upscaled = SuperResolver.from_pretrained(str(weights["sr2"]), batch_size=cfg.batch_size).upscale(src, 2)
    expected = FrameInterpolator.from_pretrained(str(weights["rife"]), batch_size=cfg.batch_size).interpolate(
        upscaled, 2)
    assert np.array_equal(out, expected)
    info = stage.last_run_info()
    assert info["input"] == {"frames": 5, "height": 32, "width": 48, "bytes": src.nbytes}
    assert info["output"] == {"frames": 9, "height": 64, "width": 96}
    assert info["super_resolution"]["factor"] == 2 and info["interpolation"]["factor"] == 2
    # the metadata names the weights used
    assert info["super_resolution"]["source"] == str(weights["sr2"])
    assert info["interpolation"]["source"] == str(weights["rife"])
    # one factor alone
    assert stage.enhance(src, fps_factor=4).shape == (17, 32, 48, 3)
    assert stage.enhance(src, sr_factor=2).shape == (5, 64, 96, 3) and "interpolation" not in stage.last_run_info()


def test_speed_uses_the_lighter_weights_and_an_x4_model_serves_2x(weights):
    cfg = EnhanceConfig(sr={"source": str(weights["sr4"]), "scale": 4},
                        sr_fast={"source": str(weights["fast"]), "scale": 2})
    stage = EnhancingStage.from_config(cfg)
    assert stage.enhance(frames(2), sr_factor=2, sr_model="sr_fast").shape == (2, 64, 96, 3)
    assert stage.last_run_info()["super_resolution"]["weights"] == "sr_fast"
    assert stage.last_run_info()["super_resolution"]["architecture"] == "RealESRGAN Compact"
    assert stage.enhance(frames(2), sr_factor=4).shape == (2, 128, 192, 3)
    assert stage.enhance(frames(2), sr_factor=2).shape == (2, 64, 96, 3)  # x4 weights, downscaled
    with pytest.raises(ValueError, match="RIFE"):
        stage.enhance(frames(2), fps_factor=2)


def test_weights_of_another_scale_than_configured_are_refused(weights):
    cfg = EnhanceConfig(sr={"source": str(weights["sr4"]), "scale": 2})
    with pytest.raises(ValueError, match="x4 model, the config says scale 2"):
        EnhancingStage.from_config(cfg)
