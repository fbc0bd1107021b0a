"""The VAE replica's decode on CUDA: uint8 frames made on the device, and cudnn.benchmark (cheap: runs first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.models.tiny import write_tiny_model
from serve.stages.decoding import DecodingStage
from serve.stages.types import Latents

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"5b": str(write_tiny_model("5b", tmp_path_factory.mktemp("gpu-decode-models") / "tiny-5b"))}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_uint8_frames_on_cuda_match_the_host_conversion_bit_for_bit(models, dtype):
    from serve.stages.decoding import to_uint8

    stage = DecodingStage.from_pretrained(models["5b"], device="cuda", dtype=dtype)
    z = np.random.default_rng(1).standard_normal((1, 3, 16, 8, 12)).astype(np.float32) * 3
    frames = stage.decode_uint8(Latents(latents=z))
    assert frames.dtype == np.uint8 and frames.shape == (9, 64, 96, 3)
    np.testing.assert_array_equal(frames, to_uint8(stage.decode(Latents(latents=z))))


def test_vae_cudnn_benchmark_on_cuda(models):
    old = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        plain = DecodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16)
        z = np.random.default_rng(2).standard_normal((1, 3, 16, 8, 12)).astype(np.float32)
        expected = plain.decode(Latents(latents=z))
        tuned = DecodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16,
                                              cudnn_benchmark=True)
        assert tuned.cudnn_benchmark and torch.backends.cudnn.benchmark
        assert tuned.warmup([(9, 64, 96)])
        # another algorithm may round differently; it must still be the same video
        assert np.abs(tuned.decode(Latents(latents=z)) - expected).max() < 2e-2
    finally:
        torch.backends.cudnn.benchmark = old
