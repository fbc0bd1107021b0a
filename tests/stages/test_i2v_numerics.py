"""Image-to-video: the staged chain (text encoder, image encoder on the VAE, denoiser, decoder) gives the frames
of diffusers' `CogVideoXImageToVideoPipeline` with the same weights, image, prompt, seed and parameters.

Both tiny I2V variants (5b-I2V: learned positions, DPM; 1.5-I2V: temporal patches, `ofs`, inverted image
scaling), with CFG on and off, a non-square image and one whose aspect ratio differs from the output's (the
preprocessing stretches, as the pipeline's). The generator's state travels from the image encoder to the
denoiser, so the draws happen in the pipeline's order: encoder sample, initial noise, DPM's per-step noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from serve.stages.types import SamplingParams

# the tiny variants' native geometry (serve/presets.py tiny models: the 5b-I2V's learned positions fix its size)
GEOMETRY = {"5b-i2v": dict(height=32, width=48, num_frames=9), "1.5-i2v": dict(height=32, width=48, num_frames=17)}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _params(variant: str, **overrides) -> SamplingParams:
    values = dict(num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=True, seed=4321, fps=8,
                  **GEOMETRY[variant])
    values.update(overrides)
    return SamplingParams(**values)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """variant -> (model dir, its loaded stages)."""
    from serve.models.tiny import write_tiny_model
    from serve.stages.decoding import DecodingStage
    from serve.stages.denoising import DenoisingStage
    from serve.stages.image_encoding import ImageEncodingStage
    from serve.stages.text_encoding import TextEncodingStage

    root = tmp_path_factory.mktemp("tiny-i2v")
    out = {}
    for variant in GEOMETRY:
        path = str(write_tiny_model(variant, root / variant))
        out[variant] = (path, TextEncodingStage.from_pretrained(path), ImageEncodingStage.from_pretrained(path),
                        DenoisingStage.from_pretrained(path), DecodingStage.from_pretrained(path))
    return out


def _pipeline_frames(path: str, image: Image.Image, prompt: str, negative: str | None, p: SamplingParams,
                     output_type: str = "np") -> np.ndarray:
    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=image, prompt=prompt, negative_prompt=negative, num_frames=p.num_frames, height=p.height,
               width=p.width, num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
               use_dynamic_cfg=p.use_dynamic_cfg, generator=torch.Generator("cpu").manual_seed(p.seed),
               output_type=output_type).frames
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


CASES = [
    pytest.param("5b-i2v", 6.0, (48, 32), id="5b-i2v-cfg"),
    pytest.param("5b-i2v", 1.0, (48, 32), id="5b-i2v-nocfg"),
    pytest.param("5b-i2v", 6.0, (40, 72), id="5b-i2v-portrait-image"),  # aspect differs: stretched
    pytest.param("1.5-i2v", 6.0, (48, 32), id="1.5-i2v-cfg"),
    pytest.param("1.5-i2v", 1.0, (56, 40), id="1.5-i2v-nocfg-other-aspect"),
    pytest.param("1.5-i2v", 6.0, (33, 71), id="1.5-i2v-odd-sized-image"),
]


@pytest.mark.parametrize(("variant", "guidance_scale", "image_size"), CASES)
def test_staged_i2v_matches_the_pipeline(i2v, variant, guidance_scale, image_size):
    path, text, image_encoder, denoiser, decoder = i2v[variant]
    p = _params(variant, guidance_scale=guidance_scale, use_dynamic_cfg=guidance_scale > 1)
    image = _image(*image_size)
    prompt, negative = "a red panda walking in the forest", "blurry"

    emb = text.encode(prompt, negative, do_cfg=p.do_classifier_free_guidance)
    encoded = image_encoder.encode(image, p)
    latents = denoiser.denoise(emb, p, image=encoded)
    frames = decoder.decode(latents)

    expected = _pipeline_frames(path, image, prompt, negative, p)[0]
    assert frames.shape == (p.num_frames, p.height, p.width, 3) == expected.shape
    assert np.abs(frames - expected).max() <= 1e-5


def test_the_generator_state_carries_the_encoders_draw(i2v):
    """Without the encoder's state the denoiser would draw the encoder's numbers again as its noise: the
    result would differ from the pipeline's."""
    import dataclasses

    path, text, image_encoder, denoiser, _ = i2v["5b-i2v"]
    p = _params("5b-i2v")
    emb = text.encode("a cat", None, do_cfg=True)
    encoded = image_encoder.encode(_image(48, 32), p)
    fresh = torch.Generator("cpu").manual_seed(p.seed).get_state().numpy().tobytes()
    assert encoded.generator_state != fresh  # the encoder drew from it
    right = denoiser.denoise(emb, p, image=encoded).latents
    wrong = denoiser.denoise(emb, p, image=dataclasses.replace(encoded, generator_state=fresh)).latents
    expected = _pipeline_frames(path, _image(48, 32), "a cat", None, p, output_type="latent")
    assert np.abs(right - expected).max() <= 1e-5
    assert np.abs(wrong - expected).max() > 1e-3


def test_each_model_kind_refuses_the_others_input(i2v, stages):
    _, text, image_encoder, denoiser, _ = i2v["5b-i2v"]
    p = _params("5b-i2v")
    emb = text.encode("a cat", None, do_cfg=True)
    with pytest.raises(ValueError, match="needs the image latents"):
        denoiser.denoise(emb, p)
    t2v_text, t2v_denoiser, _ = stages("5b")
    with pytest.raises(ValueError, match="takes no image"):
        t2v_denoiser.denoise(t2v_text.encode("a cat", None, do_cfg=True), p, image=image_encoder.encode(_image(48, 32), p))


def test_the_image_encoder_refuses_a_text_to_video_model(tiny_models):
    from serve.stages.image_encoding import ImageEncodingStage

    with pytest.raises(ValueError, match="takes no image"):
        ImageEncodingStage.from_pretrained(str(tiny_models["5b"]))


def test_the_vaedecoders_shared_tiled_vae_still_encodes_untiled(i2v):
    """The VaeDecoder replica encodes on the VAE its decode tiles: the encode must not tile (tiling changes the
    encoder's numbers), and the decode's tiling stays on afterwards."""
    from serve.stages.decoding import DecodingStage
    from serve.stages.image_encoding import ImageEncodingStage

    path, _, image_encoder, _, _ = i2v["5b-i2v"]
    p = _params("5b-i2v")
    decoder = DecodingStage.from_pretrained(path, enable_tiling=True)
    # tiles smaller than the picture: a tiled encode would run, and give other numbers
    decoder.vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=32)
    shared = ImageEncodingStage.sharing(decoder.vae, path)
    image = _image(48, 32, seed=5)
    got, want = shared.encode(image, p), image_encoder.encode(image, p)
    assert np.abs(got.latents - want.latents).max() <= 1e-6 and got.generator_state == want.generator_state
    assert decoder.vae.use_tiling  # the decode still tiles
    pixels = shared.video_processor.preprocess(image, height=32, width=48).unsqueeze(2)
    with torch.inference_mode():
        tiled = decoder.vae._encode(pixels)
        decoder.vae.use_tiling = False
        untiled = decoder.vae._encode(pixels)
    assert (tiled - untiled).abs().max() > 1e-4  # tiling would have mattered here


def test_an_image_to_video_denoiser_warms_up_without_an_image(i2v):
    """A replica with `accel.warmup_on_start` warms every configured shape up before any request brings an
    image: the warm-up makes blank image latents of the request's shape itself."""
    for variant in GEOMETRY:
        _, _, _, denoiser, _ = i2v[variant]
        g = GEOMETRY[variant]
        seconds = denoiser.warmup([(g["num_frames"], g["height"], g["width"])], steps=1, without_cfg=True)
        assert set(seconds) == {f"{g['num_frames']}x{g['height']}x{g['width']}",
                                f"{g['num_frames']}x{g['height']}x{g['width']}/nocfg"}
