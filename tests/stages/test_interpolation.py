"""RIFE frame interpolation (serve/stages/interpolation.py): frame counts and placement, scene cuts,
the Practical-RIFE 4.25 checkpoint layout, batching. CPU, a tiny random IFNet (serve/models/tiny_enhance.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve.models.tiny_enhance import write_tiny_rife
from serve.stages.interpolation import (
    DEFAULT_SCENE_CUT_THRESHOLD,
    FrameInterpolator,
    IFNet,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_rife(tmp_path_factory.mktemp("tiny-rife"), seed=0)


@pytest.fixture(scope="module")
def interp(tiny_dir):
    return FrameInterpolator.from_pretrained(str(tiny_dir))


def _smooth_scene(rng, n, h, w, lo, hi, dx=2):
    """`n` frames of a smooth random colour field in [lo, hi] panning `dx` px per frame."""
    base = torch.from_numpy(rng.uniform(lo, hi, (1, 3, 4, 6)).astype(np.float32))
    big = F.interpolate(base, size=(h, w + n * abs(dx)), mode="bilinear", align_corners=False)[0]
    x0 = [i * dx if dx >= 0 else (n - 1 - i) * -dx for i in range(n)]
    frames = [big[:, :, x : x + w].permute(1, 2, 0).numpy() for x in x0]
    return (np.stack(frames) * 255).round().astype(np.uint8)


def _moving_square(n, h, w, step=3, size=12):
    """A white square moving `step` px per frame over a horizontal gradient that shifts too."""
    xs = np.arange(w, dtype=np.float32)
    frames = []
    for i in range(n):
        g = 0.3 + 0.3 * (((xs + 2 * i) % w) / w)
        f = np.broadcast_to(g[None, :, None], (h, w, 3)).copy()
        x0 = 4 + i * step
        f[h // 2 - size // 2 : h // 2 + size // 2, x0 : x0 + size] = 1.0
        frames.append(f)
    return (np.stack(frames) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("size", [(48, 32), (72, 40), (64, 64)])
@pytest.mark.parametrize("factor", [2, 4])
def test_counts_positions_dtype(interp, size, factor):
    w, h = size
    rng = np.random.default_rng(1)
    frames = _smooth_scene(rng, 5, h, w, 0.2, 0.8)
    out = interp.interpolate(frames, factor)
    assert out.dtype == np.uint8
    assert out.shape == (factor * (len(frames) - 1) + 1, h, w, 3)
    assert len(out) == {2: 2 * 5 - 1, 4: 4 * 5 - 3}[factor]
    np.testing.assert_array_equal(out[::factor], frames)  # originals exactly, at i * factor
    assert interp.last_scene_cuts == []
    # the inserted frames come from the model, not copies of the neighbours
    for i in range(len(frames) - 1):
        for k in range(1, factor):
            assert not np.array_equal(out[i * factor + k], frames[i])


def test_factor_one_and_single_frame(interp):
    frames = _moving_square(3, 32, 48)
    assert interp.interpolate(frames, 1) is frames
    one = frames[:1]
    assert interp.interpolate(one, 4) is one
    with pytest.raises(ValueError):
        interp.interpolate(frames.astype(np.float32), 2)
    with pytest.raises(ValueError):
        interp.interpolate(frames, 0)


def test_inserted_frames_are_the_model_at_k_over_factor(interp):
    """Placement and conversion: frame i*4+k is round(255 * IFNet(f_i/255, f_i+1/255, t=k/4)), clamped."""
    frames = _moving_square(3, 40, 72)
    out = interp.interpolate(frames, 4)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        for i in range(2):
            for k in range(1, 4):
                y = interp.model(x[i : i + 1], x[i + 1 : i + 2], k / 4)
                ref = (y * 255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
                # within 1/255: the interpolator runs 6 pairs per batch here, this call one (see batch test)
                assert np.abs(out[i * 4 + k].astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("factor", [2, 4])
def test_scene_cut_detected_and_not_blended(interp, factor):
    rng = np.random.default_rng(2)
    a = _smooth_scene(rng, 4, 32, 48, 0.05, 0.4)  # dark shot
    b = _smooth_scene(rng, 4, 32, 48, 0.6, 0.95, dx=-3)  # bright, different shot
    frames = np.concatenate([a, b])
    out = interp.interpolate(frames, factor)
    assert interp.last_scene_cuts == [3]
    scores = interp.last_scene_cut_scores
    assert scores[3] > DEFAULT_SCENE_CUT_THRESHOLD
    assert max(s for i, s in enumerate(scores) if i != 3) < DEFAULT_SCENE_CUT_THRESHOLD / 2
    np.testing.assert_array_equal(out[::factor], frames)
    for k in range(1, factor):  # copies of the earlier frame (frame 3), not blends
        np.testing.assert_array_equal(out[3 * factor + k], frames[3])
    for i in (0, 1, 2, 4, 5, 6):  # elsewhere interpolated as usual
        assert not np.array_equal(out[i * factor + 1], frames[i])


def test_no_scene_cut_in_smooth_motion(interp):
    frames = _moving_square(8, 32, 64)
    out = interp.interpolate(frames, 2)
    assert interp.last_scene_cuts == []
    assert max(interp.last_scene_cut_scores) < DEFAULT_SCENE_CUT_THRESHOLD / 2
    assert len(out) == 15
    # scoring alone (no model) on bigger frames with faster motion
    big = _moving_square(6, 96, 128, step=8, size=32)
    assert max(interp.scene_cut_scores(big)) < DEFAULT_SCENE_CUT_THRESHOLD / 2
    pan = _smooth_scene(np.random.default_rng(3), 6, 96, 128, 0.0, 1.0, dx=6)
    assert max(interp.scene_cut_scores(pan)) < DEFAULT_SCENE_CUT_THRESHOLD / 2


def test_cut_threshold_none_disables(tiny_dir):
    rng = np.random.default_rng(2)
    frames = np.concatenate([_smooth_scene(rng, 2, 32, 48, 0.05, 0.4), _smooth_scene(rng, 2, 32, 48, 0.6, 0.95)])
    it = FrameInterpolator.from_pretrained(tiny_dir, scene_cut_threshold=None)
    out = it.interpolate(frames, 2)
    assert it.last_scene_cuts == []
    assert not np.array_equal(out[3], frames[1])


def test_batch_size_independent(tiny_dir):
    """batch_size 1 vs 8: equal within 1/255. On CPU the conv kernels may block/accumulate differently per
    batch size, so a float can differ in its last bits and flip a rounding at .5; in practice it is exact."""
    frames = _smooth_scene(np.random.default_rng(4), 5, 40, 72, 0.1, 0.9)
    outs = [FrameInterpolator.from_pretrained(tiny_dir, batch_size=bs).interpolate(frames, 4) for bs in (1, 8)]
    diff = np.abs(outs[0].astype(int) - outs[1].astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


# ---- the published Practical-RIFE 4.25 layout --------------------------------------------------------------


def _published_425_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of Practical-RIFE 4.25's IFNet state dict (train_log/IFNet_HDv3.py), written out by hand."""
    layout: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate((192, 128, 96, 64, 32)):
        cin = 7 + 32 if i == 0 else 8 + 4 + 8 + 32
        p = f"block{i}."
        layout[p + "conv0.0.0.weight"] = (c // 2, cin, 3, 3)
        layout[p + "conv0.0.0.bias"] = (c // 2,)
        layout[p + "conv0.1.0.weight"] = (c, c // 2, 3, 3)
        layout[p + "conv0.1.0.bias"] = (c,)
        for j in range(8):
            layout[p + f"convblock.{j}.beta"] = (1, c, 1, 1)
            layout[p + f"convblock.{j}.conv.weight"] = (c, c, 3, 3)
            layout[p + f"convblock.{j}.conv.bias"] = (c,)
        layout[p + "lastconv.0.weight"] = (c, 4 * 13, 4, 4)  # ConvTranspose2d: [in, out, k, k]
        layout[p + "lastconv.0.bias"] = (4 * 13,)
    for j, cin in enumerate((3, 16, 16, 16)):
        shape = (16, 16, 4, 4) if j == 3 else (16, cin, 3, 3)
        layout[f"encode.cnn{j}.weight"] = shape
        layout[f"encode.cnn{j}.bias"] = (16,)
    return layout


def test_default_widths_match_published_425_layout():
    state = IFNet().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _published_425_layout()
    assert len(state) == 158
    # facts of the real file, literally
    assert tuple(state["block0.conv0.0.0.weight"].shape) == (96, 39, 3, 3)
    assert tuple(state["block1.conv0.0.0.weight"].shape) == (64, 52, 3, 3)
    assert tuple(state["block4.lastconv.0.weight"].shape) == (32, 52, 4, 4)
    assert tuple(state["encode.cnn3.weight"].shape) == (16, 16, 4, 4)
    assert sum(v.numel() for v in state.values()) == 5_723_156


def test_published_layout_with_module_prefix_loads_strictly(tmp_path):
    torch.manual_seed(0)
    src = IFNet()
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "flownet.pkl")
    it = FrameInterpolator.from_pretrained(tmp_path / "flownet.pkl")  # a file path works too
    assert it.model.block_widths == (192, 128, 96, 64, 32) and it.model.head_channels == 16
    loaded = it.model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v)
    assert not it.model.training
    # strict: a missing or an unknown tensor is an error
    bad = {f"module.{k}": v for k, v in src.state_dict().items() if k != "block2.convblock.3.beta"}
    torch.save(bad, tmp_path / "missing.pkl")
    with pytest.raises(RuntimeError, match="Missing"):
        FrameInterpolator.from_pretrained(tmp_path / "missing.pkl")
    extra = {**{f"module.{k}": v for k, v in src.state_dict().items()}, "module.block0.extra": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pkl")
    with pytest.raises(RuntimeError, match="Unexpected"):
        FrameInterpolator.from_pretrained(tmp_path / "extra.pkl")


def test_tiny_checkpoint_round_trips(tiny_dir, interp):
    saved = torch.load(tiny_dir / "flownet.pkl", weights_only=True)
    assert saved and all(k.startswith("module.") for k in saved)
    assert {k.removeprefix("module.") for k in saved} == set(_published_425_layout())  # same key names
    loaded = interp.model.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in saved.items())
    # deterministic per seed
    again = torch.load(write_tiny_rife(tiny_dir.parent / "again", seed=0) / "flownet.pkl", weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in saved.items())


def test_ifnet_pads_and_crops():
    torch.manual_seed(0)
    net = IFNet((8, 8, 8, 8, 8), 4).eval()
    assert net.pad_multiple() == 64 and net.scale_list() == [16, 8, 4, 2, 1]
    a, b = torch.rand(2, 3, 40, 72), torch.rand(2, 3, 40, 72)
    with torch.inference_mode():
        y = net(a, b, 0.5)
        y_t = net(a, b, torch.tensor([0.5, 0.5]))
    assert y.shape == (2, 3, 40, 72)
    assert torch.equal(y, y_t)


def _golden_weights(net: IFNet) -> dict[str, torch.Tensor]:
    """Deterministic weights from numpy's RNG (independent of torch's init), in state-dict order."""
    rng = np.random.default_rng(0)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("beta"):
            a = 1 + 0.1 * rng.standard_normal(v.shape)
        elif v.ndim == 1:
            a = 0.05 * rng.standard_normal(v.shape)
        else:
            a = rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[1:]))
        sd[k] = torch.from_numpy(a.astype(np.float32))
    return sd


def _golden_frame(shift: float) -> torch.Tensor:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    r = 0.5 + 0.4 * np.sin((xx - shift) / 7.0)
    g = 0.5 + 0.4 * np.cos(yy / 9.0 + (xx - shift) / 11.0)
    return torch.from_numpy(np.stack([r, g, np.full_like(r, 0.3)]))[None]


def test_forward_matches_practical_rife_reference_values():
    """Values computed once with Practical-RIFE's own `train_log/IFNet_HDv3.py` (4.25, commit f7edc95) and
    `model/warplayer.py`, same weights and inputs, `merged[4]` at scale_list [16, 8, 4, 2, 1]; this
    implementation matched it to 0.0 max abs difference at 1 and 2 threads."""
    net = IFNet().eval()
    net.load_state_dict(_golden_weights(net), strict=True)
    a, b = _golden_frame(0), _golden_frame(4)
    with torch.inference_mode():
        y = net(a, b, 0.5)
        y25 = net(a, b, 0.25)
    tol = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.tensor([0.5804609656, 0.5007432103, 0.3]), **tol)
    torch.testing.assert_close(y[0, :, 10, 20], torch.tensor([0.7295501232, 0.2372563183, 0.3]), **tol)
    torch.testing.assert_close(y[0, :, 50, 40], torch.tensor([0.2151388973, 0.1114559174, 0.3]), **tol)
    torch.testing.assert_close(y25.mean((0, 2, 3)), torch.tensor([0.5806220174, 0.5000591278, 0.3]), **tol)
    torch.testing.assert_close(y25[0, :, 10, 20], torch.tensor([0.7269918323, 0.2278213948, 0.3]), **tol)


class _LinearBlend(torch.nn.Module):
    """Stands in for IFNet: (1 - t) * img0 + t * img1, so every inserted frame's value is known exactly."""

    def forward(self, img0, img1, timestep, scale=1.0):
        t = timestep.reshape(-1, 1, 1, 1)
        return (1 - t) * img0 + t * img1


@pytest.mark.parametrize("batch_size", [1, 5])
def test_timesteps_placement_and_rounding_exact(batch_size):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (4, 8, 12, 3), dtype=np.uint8)
    it = FrameInterpolator(_LinearBlend(), batch_size=batch_size, scene_cut_threshold=None)
    out = it.interpolate(frames, 4)
    x = torch.from_numpy(frames).float() / 255.0
    for i in range(3):
        for k in range(4):
            t = torch.tensor(k / 4, dtype=torch.float32)
            ref = ((1 - t) * x[i] + t * x[i + 1]) * 255
            ref = ref.round().clamp(0, 255).to(torch.uint8).numpy()
            np.testing.assert_array_equal(out[i * 4 + k], ref, err_msg=f"pair {i}, k={k}")
