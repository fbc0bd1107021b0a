"""Speed options on CUDA with the tiny models: SDPA backends, inductor compile, fp8, cache hooks,
the tiled-decode fallback on a real out-of-memory error, and warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.config.accel import AccelConfig
from serve.models.tiny import write_tiny_model
from serve.stages.decoding import DecodingStage
from serve.stages.denoising import DenoisingStage
from serve.stages.text_encoding import TextEncodingStage
from serve.stages.types import AccelUnavailable, Latents, SamplingParams

pytestmark = pytest.mark.gpu

DTYPES = {"2b": torch.float16, "5b": torch.bfloat16}  # the presets' dtypes
CACHES = {
    "first_block": {"cache": "first_block", "first_block": {"threshold": 1.0}},  # engages on tiny weights
    "pab": {"cache": "pab"},
    "faster": {"cache": "faster"},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-accel-models")
    return {v: str(write_tiny_model(v, root / f"tiny-{v}")) for v in ("2b", "5b")}


@pytest.fixture(scope="module")
def emb(models):
    # bf16 T5, as the runtime loads it on a GPU
    return TextEncodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16).encode(
        "a panda walking in the forest", None, do_cfg=True)


def params(**overrides) -> SamplingParams:
    values = dict(num_frames=9, height=32, width=48, num_inference_steps=8, guidance_scale=6.0,
                  use_dynamic_cfg=True, seed=11, fps=8)
    values.update(overrides)
    return SamplingParams(**values)


def denoiser(path, variant="5b", **accel) -> DenoisingStage:
    return DenoisingStage.from_pretrained(path, device="cuda", dtype=DTYPES[variant],
                                          accel=AccelConfig(**accel) if accel else None)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def baseline(models, emb) -> np.ndarray:
    return denoiser(models["5b"]).denoise(emb, params()).latents


def test_bf16_text_encoder_tracks_fp32(models):
    fp32 = TextEncodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.float32)
    bf16 = TextEncodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16)
    a, b = bf16.encode("a cat", "rain", True), fp32.encode("a cat", "rain", True)
    assert a.positive.dtype == np.float32 and np.isfinite(a.positive).all()
    assert rel_l2(a.positive, b.positive) < 0.02 and rel_l2(a.negative, b.negative) < 0.02


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_sdpa_backend_matches_stock(backend, models, emb, baseline):
    try:
        stage = denoiser(models["5b"], attention_backend=backend)
    except AccelUnavailable as exc:
        # math runs everywhere and flash on every card from Ampere on; cuDNN's and the memory-efficient
        # kernel's coverage depends on the card and the torch build: only their absence is a skip
        if backend == "math" or (backend == "flash" and torch.cuda.get_device_capability() >= (8, 0)):
            raise
        pytest.skip(f"this card/build has no {backend} SDPA kernel: {exc}")
    out = stage.denoise(emb, params()).latents
    assert np.isfinite(out).all()
    assert rel_l2(out, baseline) < 0.02


@pytest.mark.parametrize("name", list(CACHES))
def test_cache_hooks_on_cuda(name, models, emb, baseline):
    stage = denoiser(models["5b"], **CACHES[name])
    speed = stage.denoise(emb, params(quality="speed")).latents
    assert stage.last_cache_used == name and not stage.transformer.is_cache_enabled
    assert np.isfinite(speed).all()
    assert 1e-3 < rel_l2(speed, baseline) < 0.1
    again = stage.denoise(emb, params(quality="speed")).latents
    np.testing.assert_allclose(again, speed, atol=1e-3)
    quality = stage.denoise(emb, params()).latents
    np.testing.assert_allclose(quality, baseline, atol=1e-3)


def test_regional_compile_with_first_block_cache_matches_eager(models, emb, baseline):
    from torch._dynamo.utils import counters

    stage = denoiser(models["5b"], compile="regional", **CACHES["first_block"])
    stage.warmup([(9, 32, 48)], steps=2)
    graphs = counters["stats"]["unique_graphs"]
    out = stage.denoise(emb, params()).latents
    speed = stage.denoise(emb, params(quality="speed")).latents
    assert counters["stats"]["unique_graphs"] == graphs  # requests of a warmed shape compile nothing
    assert rel_l2(out, baseline) < 0.02
    eager_speed = denoiser(models["5b"], **CACHES["first_block"]).denoise(emb, params(quality="speed")).latents
    assert rel_l2(speed, eager_speed) < 0.02
    # a shape outside the warmed-up buckets runs eagerly with inductor too: counted, nothing compiled
    other = params(num_frames=17, height=48, width=64)
    out = stage.denoise(emb, other).latents
    assert not stage.last_run_compiled and stage.uncompiled_runs == 1
    assert counters["stats"]["unique_graphs"] == graphs
    assert rel_l2(out, denoiser(models["5b"]).denoise(emb, other).latents) < 0.02


def test_a_guard_miss_inside_a_compiled_bucket_is_counted_with_inductor(models, emb):
    from serve.stages.types import PromptEmbeddings

    stage = denoiser(models["5b"], compile="regional")
    stage.warmup([(9, 32, 48)], steps=1)
    stage.denoise(emb, params(num_inference_steps=2))
    assert stage.last_run_compiled is True and stage.uncompiled_runs == 0
    short = PromptEmbeddings(positive=emb.positive[:, :100].copy(), negative=emb.negative[:, :100].copy())
    stage.denoise(short, params(num_inference_steps=2))
    assert stage.last_run_compiled is False and stage.uncompiled_runs == 1


def test_full_compile_matches_eager(models, emb, baseline):
    # full graph with the flash kernel pinned where the card has it: sdpa_kernel inside inductor's graph
    backend = "flash" if torch.cuda.get_device_capability() >= (8, 0) else "sdpa"
    stage = denoiser(models["5b"], compile="full", attention_backend=backend)
    stage.warmup([(9, 32, 48)], steps=2)
    assert rel_l2(stage.denoise(emb, params()).latents, baseline) < 0.02


def _skip_without_fp8():
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"fp8 needs compute capability >= 8.9, this card has {torch.cuda.get_device_capability()}")


FP8 = {"fp8": True, "compile": "regional"}  # fp8 needs compile (eager dynamic quantization costs more)


def test_fp8_bf16_per_row_stays_close(models, emb, baseline):
    import torch._inductor.config as inductor_config

    _skip_without_fp8()
    tuning = inductor_config.coordinate_descent_tuning
    stage = denoiser(models["5b"], **FP8)
    # torchao's process-wide inductor tuning stays off (set_inductor_config=False)
    assert inductor_config.coordinate_descent_tuning == tuning
    stage.warmup([(9, 32, 48)], steps=2)
    out = stage.denoise(emb, params()).latents
    assert stage.accel.fp8 and stage.last_run_compiled is True and np.isfinite(out).all()
    assert rel_l2(out, baseline) < 0.3  # e4m3 keeps ~3 significant bits; this bounds it


def test_fp8_fp16_needs_per_tensor_scales(models):
    _skip_without_fp8()
    with pytest.raises(ValueError, match="needs bfloat16 weights"):
        denoiser(models["2b"], "2b", **FP8)
    text = TextEncodingStage.from_pretrained(models["2b"], device="cuda", dtype=torch.bfloat16)
    emb = text.encode("a cat", None, True)
    p = params(use_dynamic_cfg=False)
    exact = denoiser(models["2b"], "2b").denoise(emb, p).latents
    stage = denoiser(models["2b"], "2b", **FP8, fp8_granularity="tensor")
    stage.warmup([(9, 32, 48)], steps=1)
    out = stage.denoise(emb, p).latents
    assert np.isfinite(out).all() and rel_l2(out, exact) < 0.3


class RealOutOfMemoryVae:
    """Wraps a CUDA VAE; its untiled decode asks the allocator for 64 TiB, a genuine CUDA OOM."""

    def __init__(self, vae) -> None:
        self._vae = vae
        self.raised = 0

    def decode(self, z):
        if not self._vae.use_tiling:
            self.raised += 1
            torch.empty(1 << 46, dtype=torch.uint8, device=z.device)
        return self._vae.decode(z)

    def __getattr__(self, name):
        return getattr(self._vae, name)


def test_tiled_decode_fallback_on_cuda(models):
    reports = []
    stage = DecodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16)
    vae = stage.vae
    stage = DecodingStage(RealOutOfMemoryVae(vae), "cuda", on_fallback=lambda shape, exc: reports.append(shape))
    z = np.random.default_rng(0).standard_normal((1, 1, 16, 4, 48)).astype(np.float32)
    frames = stage.decode(Latents(latents=z))
    assert frames.shape == (1, 32, 384, 3) and np.isfinite(frames).all()
    assert stage.last_decode_tiled and reports == [(1, 1, 16, 4, 48)] and stage.vae.raised == 1
    expected = DecodingStage(vae, "cuda", enable_tiling=True).decode(Latents(latents=z))
    np.testing.assert_allclose(frames, expected, atol=1e-3)


def test_warmup_on_cuda(models):
    text = TextEncodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16)
    den = denoiser(models["5b"])
    dec = DecodingStage.from_pretrained(models["5b"], device="cuda", dtype=torch.bfloat16)
    shapes = [(9, 32, 48), (17, 48, 64)]
    assert text.warmup(shapes) and set(den.warmup(shapes)) == set(dec.warmup(shapes)) == {"9x32x48", "17x48x64"}
