"""Tiny model writer: layout, determinism, idempotence; the image-to-video variants load and run in diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve.models.tiny import ensure_tiny_model, main


def _weights(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*.safetensors")}


def test_layout_and_variant_structure(tiny_models):
    for variant, path in tiny_models.items():
        index = json.loads((path / "model_index.json").read_text())
        assert {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"} <= index.keys()
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        assert transformer["max_text_seq_length"] == 226
        assert transformer["use_rotary_positional_embeddings"] == (variant != "2b")
        assert transformer["patch_size_t"] == (2 if variant == "1.5" else None)
        vae = json.loads((path / "vae" / "config.json").read_text())
        assert vae["scaling_factor"] == (1.15258426 if variant == "2b" else 0.7)
        assert index["scheduler"][1] == ("CogVideoXDDIMScheduler" if variant == "2b" else "CogVideoXDPMScheduler")
        assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 10 * 2**20


def test_cli_is_deterministic_and_ensure_is_idempotent(tiny_models, tmp_path):
    out = tmp_path / "again"
    main(["--variant", "2b", "--out", str(out)])
    assert _weights(out) == _weights(tiny_models["2b"])

    mtime = (out / "model_index.json").stat().st_mtime_ns
    ensure_tiny_model("2b", out)
    assert (out / "model_index.json").stat().st_mtime_ns == mtime


# ---- image-to-video variants ----------------------------------------------------------------------------------

# variant -> (the real checkpoint it mirrors: transformer config facts, VAE invert_scale_latents)
I2V = {
    # THUDM/CogVideoX-5b-I2V: learned + rotary positions, no temporal patches, no ofs
    "5b-i2v": (dict(use_learned_positional_embeddings=True, patch_size_t=None, ofs_embed_dim=None), False),
    # THUDM/CogVideoX1.5-5B-I2V: temporal patches of 2, no patch bias, the ofs embedding, rotary only
    "1.5-i2v": (dict(use_learned_positional_embeddings=False, patch_size_t=2, patch_bias=False, ofs_embed_dim=16),
                True),
}
# the tiny variants' native geometry: (width, height, frames)
I2V_GEOMETRY = {"5b-i2v": (48, 32, 9), "1.5-i2v": (48, 32, 17)}


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    from serve.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-i2v-models")
    return {v: write_tiny_model(v, root / f"tiny-{v}") for v in I2V}


def _run_i2v(path, width, height, frames, image_size=(40, 24)):
    import numpy as np
    import torch
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    return pipe(image=Image.fromarray(pixels, "RGB"), prompt="a red panda", num_frames=frames, height=height,
                width=width, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").frames[0]


def test_i2v_variants_have_the_real_checkpoints_structure(i2v_models):
    for variant, path in i2v_models.items():
        facts, inverted = I2V[variant]
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == "CogVideoXImageToVideoPipeline"
        assert index["scheduler"][1] == "CogVideoXDPMScheduler"
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        # noise latents and image latents on the channel axis in, the noise prediction out
        assert (transformer["in_channels"], transformer["out_channels"]) == (32, 16)
        assert transformer["use_rotary_positional_embeddings"] is True
        assert {k: transformer[k] for k in facts} == facts
        if transformer["ofs_embed_dim"] is not None:  # added to the time embedding: the same width
            assert transformer["ofs_embed_dim"] == transformer["time_embed_dim"]
        vae = json.loads((path / "vae" / "config.json").read_text())
        assert vae["scaling_factor"] == 0.7 and vae["invert_scale_latents"] is inverted
        assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 10 * 2**20


@pytest.mark.parametrize("variant", list(I2V))
def test_i2v_variant_loads_through_from_pretrained_and_generates(variant, i2v_models):
    width, height, frames = I2V_GEOMETRY[variant]
    video = _run_i2v(i2v_models[variant], width, height, frames)
    assert video.shape == (frames, height, width, 3)
    assert np.isfinite(video).all() and 0 <= video.min() and video.max() <= 1


def test_tiny_5b_i2v_makes_only_its_native_size_and_1_5_i2v_either_orientation(i2v_models):
    from serve.models.tiny import TINY_5B_I2V_SIZE

    assert TINY_5B_I2V_SIZE == I2V_GEOMETRY["5b-i2v"][:2]
    # learned positional embeddings fit one latent size, as CogVideoX-5b-I2V's fit 720x480
    with pytest.raises(ValueError, match="different resolution"):
        _run_i2v(i2v_models["5b-i2v"], 64, 32, 9)
    # 1.5-i2v: portrait up to its rotary grid (128 px)
    assert _run_i2v(i2v_models["1.5-i2v"], 32, 128, 17).shape == (17, 128, 32, 3)


def test_cli_all_writes_every_variant(tmp_path):
    from serve.models.tiny import VARIANTS

    main(["--all", "--out-root", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"tiny-{v}" for v in VARIANTS)
    assert {"5b-i2v", "1.5-i2v"} <= set(VARIANTS)
    for variant in VARIANTS:
        index = json.loads((tmp_path / f"tiny-{variant}" / "model_index.json").read_text())
        expected = "CogVideoXImageToVideoPipeline" if variant.endswith("-i2v") else "CogVideoXPipeline"
        assert index["_class_name"] == expected
