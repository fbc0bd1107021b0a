"""The three stages in sequence reproduce diffusers' `CogVideoXPipeline` for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.stages.denoising import DenoisingCancelled
from serve.stages.types import SamplingParams

# 2b/5b take 8N+1 frames; 1.5 takes 16N+1. 17 frames -> 5 latent frames, odd, so 1.5's temporal
# padding is exercised.
CASES = {
    "2b": dict(num_frames=9, use_dynamic_cfg=False),
    "5b": dict(num_frames=9, use_dynamic_cfg=True),
    "1.5": dict(num_frames=17, use_dynamic_cfg=True),
}


def _params(variant: str, **overrides) -> SamplingParams:
    values = dict(height=32, width=48, num_inference_steps=5, guidance_scale=6.0, seed=1234, fps=8)
    values.update(CASES[variant])
    values.update(overrides)
    return SamplingParams(**values)


def _pipeline(path):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipeline(pipe, prompt, negative_prompt, p: SamplingParams, output_type: str) -> np.ndarray:
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_frames=p.num_frames,
        height=p.height,
        width=p.width,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        use_dynamic_cfg=p.use_dynamic_cfg,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type=output_type,
    ).frames
    return out.numpy() if isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("variant", list(CASES))
def test_stages_match_pipeline(variant, tiny_models, stages):
    text, denoiser, decoder = stages(variant)
    p = _params(variant)
    prompt, negative = "A small red panda walking in the forest, cinematic", "blurry, low quality"

    emb = text.encode(prompt, negative, do_cfg=True)
    latents = denoiser.denoise(emb, p)
    frames = decoder.decode(latents)

    pipe = _pipeline(tiny_models[variant])
    expected_frames = _run_pipeline(pipe, prompt, negative, p, "np")[0]
    # With output_type="latent" the pipeline keeps 1.5's front padding; we drop it.
    expected_latents = _run_pipeline(pipe, prompt, negative, p, "latent")

    expected_padding = 1 if variant == "1.5" else 0
    assert latents.padding_frames == expected_padding
    assert expected_latents.shape[1] == latents.latents.shape[1] + expected_padding
    assert latents.latents.dtype == np.float32
    assert np.abs(latents.latents - expected_latents[:, expected_padding:]).max() <= 1e-5

    assert frames.shape == (p.num_frames, p.height, p.width, 3) == expected_frames.shape
    assert frames.dtype == np.float32
    assert np.abs(frames - expected_frames).max() <= 1e-5

    # the replica's path: uint8 frames made on the device, identical to diffusers' frames made uint8
    from serve.stages.decoding import to_uint8

    as_bytes = decoder.decode_uint8(latents)
    assert as_bytes.dtype == np.uint8 and as_bytes.shape == expected_frames.shape
    np.testing.assert_array_equal(as_bytes, to_uint8(frames))
    assert np.abs(as_bytes.astype(np.int16) - to_uint8(expected_frames).astype(np.int16)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_uint8_on_the_device_is_the_hosts_conversion_bit_for_bit(dtype, tiny_models):
    """Half-precision VAE output (as on a GPU): rounding to uint8 in torch matches numpy's `to_uint8`
    of diffusers' float frames exactly, ties (x.5 after scaling) included."""
    from serve.stages.decoding import DecodingStage, to_uint8
    from serve.stages.types import Latents

    decoder = DecodingStage.from_pretrained(str(tiny_models["5b"]), dtype=dtype)
    z = np.random.default_rng(3).standard_normal((1, 3, 16, 4, 6)).astype(np.float32) * 3
    np.testing.assert_array_equal(decoder.decode_uint8(Latents(latents=z)), to_uint8(decoder.decode(Latents(latents=z))))


def test_the_cpu_tests_run_diffusers_peft_path():
    """The GPU image has peft, which routes every diffusers transformer forward through the PEFT
    LoRA-scale code; the CPU tests must take the same path (peft is in the test extras)."""
    import diffusers.utils
    import peft.tuners.tuners_utils  # noqa: F401 (what diffusers' path imports)

    assert diffusers.utils.USE_PEFT_BACKEND is True


@pytest.mark.parametrize(
    ("variant", "negative", "guidance_scale"),
    [("2b", None, 6.0), ("5b", None, 1.0)],
    ids=["empty-negative", "no-cfg"],
)
def test_negative_defaults_match_pipeline(variant, negative, guidance_scale, tiny_models, stages):
    text, denoiser, _ = stages(variant)
    p = _params(variant, guidance_scale=guidance_scale, num_inference_steps=3)

    emb = text.encode("a cat", negative, do_cfg=p.do_classifier_free_guidance)
    assert (emb.negative is None) == (not p.do_classifier_free_guidance)
    latents = denoiser.denoise(emb, p)

    expected = _run_pipeline(_pipeline(tiny_models[variant]), "a cat", negative, p, "latent")
    assert np.abs(latents.latents - expected).max() <= 1e-5


def test_empty_negative_embedding_is_cached(stages):
    text, _, _ = stages("2b")
    first = text.encode("a dog", None, do_cfg=True).negative
    second = text.encode("a cat", "", do_cfg=True).negative
    assert first is second
    assert not first.flags.writeable
    assert first.shape == (1, 226, 32)


def test_requests_do_not_leak_state(stages):
    # The DPM scheduler is stateful and draws noise each step: a request in between must not
    # change the result of an identical later request.
    text, denoiser, _ = stages("5b")
    emb = text.encode("a cat", None, do_cfg=True)
    steps: list[tuple[int, int]] = []
    first = denoiser.denoise(emb, _params("5b"), on_step=lambda i, n: steps.append((i, n)))
    denoiser.denoise(text.encode("a dog", "rain", do_cfg=True), _params("5b", seed=7, num_inference_steps=3))
    again = denoiser.denoise(emb, _params("5b"))

    assert steps == [(i, 5) for i in range(1, 6)]
    np.testing.assert_array_equal(first.latents, again.latents)


def test_cancel_between_steps(stages):
    text, denoiser, _ = stages("2b")
    steps: list[tuple[int, int]] = []
    with pytest.raises(DenoisingCancelled):
        denoiser.denoise(
            text.encode("a cat", None, do_cfg=True),
            _params("2b"),
            on_step=lambda i, n: steps.append((i, n)),
            should_cancel=lambda: len(steps) >= 2,
        )
    assert steps == [(1, 5), (2, 5)]


def test_tiled_decode_keeps_frame_size(tiny_models):
    from serve.stages.decoding import DecodingStage, to_uint8
    from serve.stages.types import Latents

    decoder = DecodingStage.from_pretrained(str(tiny_models["5b"]), enable_tiling=True)
    assert decoder.vae.use_tiling
    # 48 latent columns exceed the tile width (45), so this one decodes in tiles.
    z = np.random.default_rng(0).standard_normal((1, 1, 16, 4, 48)).astype(np.float32)
    frames = decoder.decode(Latents(latents=z))
    assert frames.shape == (1, 32, 384, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0

    as_bytes = to_uint8(frames)
    assert as_bytes.dtype == np.uint8
    assert np.abs(as_bytes.astype(np.float32) / 255 - frames).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(decoder.decode_uint8(Latents(latents=z)), as_bytes)
    assert decoder.last_decode_tiled
