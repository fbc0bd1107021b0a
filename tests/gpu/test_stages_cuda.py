"""The three stages on CUDA with tiny models in half precision: they run, stay finite, and track fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.models.tiny import write_tiny_model
from serve.stages.decoding import DecodingStage
from serve.stages.denoising import DenoisingStage
from serve.stages.text_encoding import TextEncodingStage
from serve.stages.types import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-models")
    return {v: write_tiny_model(v, root / f"tiny-{v}") for v in ("2b", "5b", "1.5")}


def run(path, dtype, params):
    te = TextEncodingStage.from_pretrained(str(path), device="cuda", dtype=torch.float32)
    den = DenoisingStage.from_pretrained(str(path), device="cuda", dtype=dtype)
    vae = DecodingStage.from_pretrained(str(path), device="cuda", dtype=dtype)
    emb = te.encode("a cat on a skateboard", None, params.do_classifier_free_guidance)
    return vae.decode(den.denoise(emb, params))


@pytest.mark.parametrize("variant,dtype", [("2b", torch.float16), ("5b", torch.bfloat16), ("1.5", torch.bfloat16)])
def test_half_precision_stages_on_cuda_track_fp32(models, variant, dtype):
    frames = 17 if variant == "1.5" else 9
    params = SamplingParams(num_frames=frames, height=32, width=48, num_inference_steps=4, guidance_scale=6.0,
                            use_dynamic_cfg=variant != "2b", seed=0, fps=8)
    half = run(models[variant], dtype, params)
    full = run(models[variant], torch.float32, params)
    assert half.shape == full.shape == (frames, 32, 48, 3)
    assert np.isfinite(half).all()
    assert np.abs(half - full).mean() < 0.05
