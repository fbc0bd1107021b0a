"""An untiled VAE decode that runs out of memory is retried in tiles, reported, and remembered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.stages.decoding import DecodingStage
from serve.stages.types import Latents

# 48 latent columns exceed the tiny VAE's tile width, so a tiled decode really runs in tiles.
WIDE = np.random.default_rng(0).standard_normal((1, 1, 16, 4, 48)).astype(np.float32)
NARROW = np.random.default_rng(1).standard_normal((1, 1, 16, 4, 6)).astype(np.float32)


class OutOfMemoryVae:
    """Wraps a VAE; its untiled decode of latents wider than `max_untiled_width` (any decode with
    `tiled_too`) raises `torch.OutOfMemoryError`, as a GPU short of memory would."""

    def __init__(self, vae, max_untiled_width: int = 16, tiled_too: bool = False) -> None:
        self._vae = vae
        self.max_untiled_width = max_untiled_width
        self.tiled_too = tiled_too
        self.raised = 0
        self.decoded_tiled: list[bool] = []

    def decode(self, z):
        if (self.tiled_too or not self._vae.use_tiling) and z.shape[-1] > self.max_untiled_width:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.30 GiB (simulated)")
        self.decoded_tiled.append(self._vae.use_tiling)
        return self._vae.decode(z)

    def __getattr__(self, name):
        return getattr(self._vae, name)


@pytest.fixture
def vae(tiny_models):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(str(tiny_models["5b"]), subfolder="vae").eval()


def test_out_of_memory_falls_back_to_tiles_and_reports_it(vae):
    reports = []
    fake = OutOfMemoryVae(vae)
    decoder = DecodingStage(fake, on_fallback=lambda shape, exc: reports.append((shape, type(exc))))

    frames = decoder.decode(Latents(latents=WIDE))

    assert frames.shape == (1, 32, 384, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert decoder.last_decode_tiled
    assert reports == [((1, 1, 16, 4, 48), torch.OutOfMemoryError)]
    assert decoder.fallbacks == 1 and fake.raised == 1 and fake.decoded_tiled == [True]
    assert not vae.use_tiling  # tiling was switched on for the retry only

    # the same frames as a decoder configured for tiles
    expected = DecodingStage(vae, enable_tiling=True).decode(Latents(latents=WIDE))
    vae.disable_tiling()
    np.testing.assert_array_equal(frames, expected)


def test_a_shape_that_fell_back_goes_straight_to_tiles(vae):
    fake = OutOfMemoryVae(vae)
    decoder = DecodingStage(fake)
    decoder.decode(Latents(latents=WIDE))
    decoder.decode(Latents(latents=WIDE))
    assert fake.raised == 1 and decoder.fallbacks == 1
    assert decoder.last_decode_tiled

    # a shape that fits is still decoded untiled
    frames = decoder.decode(Latents(latents=NARROW))
    assert frames.shape == (1, 32, 48, 3)
    assert not decoder.last_decode_tiled
    assert fake.decoded_tiled == [True, True, False]


def test_the_call_callback_overrides_the_stage_one(vae):
    stage_reports, call_reports = [], []
    decoder = DecodingStage(OutOfMemoryVae(vae), on_fallback=lambda *a: stage_reports.append(a))
    decoder.decode(Latents(latents=WIDE), on_fallback=lambda *a: call_reports.append(a))
    assert len(call_reports) == 1 and not stage_reports


@pytest.mark.parametrize("configured_tiles", [False, True])
def test_out_of_memory_in_tiles_is_raised(vae, configured_tiles):
    fake = OutOfMemoryVae(vae, tiled_too=True)
    decoder = DecodingStage(fake, enable_tiling=configured_tiles)
    with pytest.raises(torch.OutOfMemoryError):
        decoder.decode(Latents(latents=WIDE))
    # untiled first: one fallback, whose tiled retry fails too; configured tiles: no fallback
    assert (fake.raised, decoder.fallbacks) == ((1, 0) if configured_tiles else (2, 1))
    vae.disable_tiling()
