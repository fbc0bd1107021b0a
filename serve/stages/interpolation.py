"""Frame interpolation with RIFE: the IFNet of Practical-RIFE **v4.25** (hzwer/Practical-RIFE), in-project.

Matched version and checkpoint layout
-------------------------------------
`IFNet` reproduces `train_log/IFNet_HDv3.py` of Practical-RIFE 4.25 (the file committed to the repository,
whose `RIFE_HDv3.Model` says `self.version = 4.25`; the README recommends 4.25 "by default for most
scenes"). Its `flownet.pkl` is a `torch.save` of the IFNet state dict, saved from a DDP-wrapped model,
so every key starts with ``module.`` (the published loader, `load_model(path, -1)`, keeps only keys
containing ``module.`` and strips it). At the published widths the state dict has 158 tensors:

* ``encode.cnn{0,1,2}.weight`` ``[16, 3|16, 3, 3]`` (stride-2 conv, then two convs), ``encode.cnn3.weight``
  ``[16, 16, 4, 4]`` (a ConvTranspose2d: weight is ``[in, out, k, k]``), each with a ``[16]`` bias;
* five flow blocks ``block0..block4`` at widths ``c = 192, 128, 96, 64, 32``, each:
  ``conv0.0.0.weight [c/2, in, 3, 3]`` (in = 39 for block0: img0, img1, two 16-channel Head features,
  timestep; in = 52 for the others: warped images, warped features, timestep, mask, 8 feature channels
  from the previous block, and the 4 flow channels), ``conv0.1.0.weight [c, c/2, 3, 3]``,
  ``convblock.{0..7}.conv.weight [c, c, 3, 3]`` and ``convblock.{0..7}.beta [1, c, 1, 1]`` (ResConv),
  ``lastconv.0.weight [c, 52, 4, 4]`` (ConvTranspose2d to 4*13 channels, then PixelShuffle(2) -> 13:
  4 flow, 1 mask, 8 features); every conv has a bias.

The forward is Practical-RIFE's inference: ``scale_list = [16, 8, 4, 2, 1] / scale``, each block refines
the bidirectional flow at its scale, the last block's mask blends the two warped frames
(``warped0 * sigmoid(mask) + warped1 * (1 - sigmoid(mask))``). Warping is `grid_sample` (bilinear,
border padding, align_corners=True) as in `model/warplayer.py`. Frames are zero-padded at the bottom/right
to a multiple of 64 (``4 * scale_list[0]``: the largest down-scale, then the block's two stride-2 convs),
as `inference_img.py` does, and cropped back. The training-only parts of the published code (teacher,
contextnet/unet, ensemble) are absent there too and are not implemented.

Channel widths are constructor arguments, so a tiny random model (`serve.models.tiny_enhance.write_tiny_rife`)
has the same key names at small widths; `FrameInterpolator.from_pretrained` reads the widths back from the
state dict's shapes and loads with ``strict=True``.

Conversion: uint8 frames ``[F, H, W, 3]`` (RGB) become ``x = uint8 / 255`` as float32 (then cast to the
model dtype), laid out ``[B, 3, H, W]``; an output ``y`` becomes ``(y.float() * 255).round().clamp(0, 255)``
as uint8. Original frames are copied through untouched (never round-tripped through the model).

Scene cuts: for each neighbouring pair the score is the mean absolute difference, in [0, 1], of the two
frames' luma (BT.601 weights on the [0, 1] RGB values), each area-downscaled to 32x32. A pair whose score
is above `scene_cut_threshold` (default 0.1, i.e. 10% of full range, close to PySceneDetect's default
content threshold of 27/255) is a cut: no frame is interpolated across it, the inserted frames there are
copies of the *earlier* frame (as Practical-RIFE's `inference_video.py` does on a cut). Ordinary motion at
32x32 moves little luma (a few percent); a cut to a different shot changes most of the picture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Published Practical-RIFE 4.25 widths.
DEFAULT_BLOCK_WIDTHS: tuple[int, ...] = (192, 128, 96, 64, 32)
DEFAULT_HEAD_CHANNELS = 16
# Channels a block's lastconv emits after PixelShuffle: 4 flow (two 2-D flows), 1 mask, 8 features.
_BLOCK_OUT = 13
_BLOCK_FEAT = _BLOCK_OUT - 5

DEFAULT_SCENE_CUT_THRESHOLD = 0.1
_CUT_SIZE = (32, 32)
_LUMA = (0.299, 0.587, 0.114)

# Keys of training-only modules that some RIFE checkpoints carry; dropped (and logged) before the strict load.
_TRAINING_ONLY_PREFIXES = ("teacher.", "caltime.")


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.LeakyReLU(0.2, True))


class _Head(nn.Module):
    """Per-frame feature encoder (`encode`): full resolution in, `channels` feature maps out."""

    def __init__(self, channels: int = DEFAULT_HEAD_CHANNELS):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, channels, 3, 2, 1)
        self.cnn1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.cnn2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(channels, channels, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class _ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones((1, c, 1, 1)))
        self.relu = nn.LeakyReLU(0.2, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class _IFBlock(nn.Module):
    """One flow block: works at 1/scale, downsamples 4x more, 8 ResConvs, upsamples back; emits 13 channels."""

    def __init__(self, in_planes: int, c: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_planes, c // 2, 2), _conv(c // 2, c, 2))
        self.convblock = nn.Sequential(*[_ResConv(c) for _ in range(8)])
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * _BLOCK_OUT, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float):
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        feat = self.convblock(self.conv0(x))
        tmp = self.lastconv(feat)
        tmp = F.interpolate(tmp, scale_factor=scale, mode="bilinear", align_corners=False)
        return tmp[:, :4] * scale, tmp[:, 4:5], tmp[:, 5:]


def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp `img` [B,C,H,W] by `flow` [B,2,H,W] (pixels), as Practical-RIFE's `warplayer.warp`."""
    b, _, h, w = flow.shape
    gx = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    gy = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    norm = torch.cat([flow[:, 0:1] / ((img.shape[3] - 1.0) / 2.0), flow[:, 1:2] / ((img.shape[2] - 1.0) / 2.0)], 1)
    grid = (torch.cat([gx, gy], 1) + norm).permute(0, 2, 3, 1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    """Practical-RIFE 4.25 IFNet. `block_widths` (one per flow block, even) and `head_channels` set the size;
    the defaults are the published ones. ``forward(img0, img1, timestep, scale)`` -> the frame at `timestep`."""

    def __init__(
        self,
        block_widths: Sequence[int] = DEFAULT_BLOCK_WIDTHS,
        head_channels: int = DEFAULT_HEAD_CHANNELS,
    ):
        super().__init__()
        widths = tuple(int(c) for c in block_widths)
        if not widths or any(c < 2 or c % 2 for c in widths):
            raise ValueError(f"block_widths must be even and >= 2, got {block_widths!r}")
        self.block_widths = widths
        self.head_channels = int(head_channels)
        h = self.head_channels
        first_in = 3 + 3 + 2 * h + 1  # img0, img1, f0, f1, timestep
        later_in = 3 + 3 + 2 * h + 1 + 1 + _BLOCK_FEAT + 4  # warped imgs, warped feats, t, mask, feat, flow
        for i, c in enumerate(widths):
            self.add_module(f"block{i}", _IFBlock(first_in if i == 0 else later_in, c))
        self.encode = _Head(h)

    @property
    def blocks(self) -> list[_IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.block_widths))]

    def scale_list(self, scale: float = 1.0) -> list[float]:
        n = len(self.block_widths)
        return [2.0 ** (n - 1 - i) / scale for i in range(n)]

    def pad_multiple(self, scale: float = 1.0) -> int:
        """Frame sides are padded to a multiple of this (64 for the published five blocks at scale 1)."""
        return max(2, int(round(4 * self.scale_list(scale)[0])))

    def forward(
        self,
        img0: torch.Tensor,
        img1: torch.Tensor,
        timestep: float | torch.Tensor = 0.5,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """`img0`, `img1`: [B, 3, H, W] in [0, 1]; `timestep`: a float or a [B] tensor in [0, 1] (0 -> img0).

        Returns the merged frame [B, 3, H, W] (not clamped, as in Practical-RIFE)."""
        b, _, h, w = img0.shape
        m = self.pad_multiple(scale)
        ph, pw = (h - 1) // m * m + m, (w - 1) // m * m + m
        if (ph, pw) != (h, w):
            pad = (0, pw - w, 0, ph - h)
            img0, img1 = F.pad(img0, pad), F.pad(img1, pad)
        if torch.is_tensor(timestep):
            t = timestep.to(device=img0.device, dtype=img0.dtype).reshape(-1, 1, 1, 1).expand(b, 1, ph, pw)
        else:
            t = img0.new_full((b, 1, ph, pw), float(timestep))
        f0, f1 = self.encode(img0), self.encode(img1)
        flow = mask = feat = None
        warped0, warped1 = img0, img1
        for block, s in zip(self.blocks, self.scale_list(scale)):
            if flow is None:
                flow, mask, feat = block(torch.cat((img0, img1, f0, f1, t), 1), None, scale=s)
            else:
                wf0, wf1 = warp(f0, flow[:, :2]), warp(f1, flow[:, 2:4])
                fd, mask, feat = block(torch.cat((warped0, warped1, wf0, wf1, t, mask, feat), 1), flow, scale=s)
                flow = flow + fd
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        mask = torch.sigmoid(mask)
        merged = warped0 * mask + warped1 * (1 - mask)
        return merged[:, :, :h, :w]


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def ifnet_from_state_dict(state: dict[str, torch.Tensor]) -> IFNet:
    """Build an IFNet whose widths are read from `state`'s shapes (keys with or without ``module.``) and load
    it strictly. Keys of training-only modules (``teacher.``, ``caltime.``) are dropped first."""
    state = _strip_module_prefix(state)
    dropped = [k for k in state if k.startswith(_TRAINING_ONLY_PREFIXES)]
    if dropped:
        logger.info("RIFE checkpoint: dropping %d training-only tensors (%s...)", len(dropped), dropped[0])
        state = {k: v for k, v in state.items() if k not in dropped}
    n = 0
    while f"block{n}.conv0.1.0.weight" in state:
        n += 1
    if n == 0 or "encode.cnn0.weight" not in state:
        raise ValueError("not a Practical-RIFE 4.25 IFNet state dict (no block0.conv0 / encode.cnn0 keys)")
    widths = [int(state[f"block{i}.conv0.1.0.weight"].shape[0]) for i in range(n)]
    head = int(state["encode.cnn0.weight"].shape[0])
    model = IFNet(widths, head)
    model.load_state_dict(state, strict=True)
    return model


class FrameInterpolator:
    """Inserts RIFE frames between the frames of a uint8 video, skipping scene cuts.

    `interpolate(frames, factor)` returns ``factor * (F - 1) + 1`` frames; original frame i is at
    index ``i * factor`` unchanged, and between it and frame i+1 sit the frames at t = k / factor, k = 1..factor-1.
    """

    def __init__(
        self,
        model: IFNet,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        scene_cut_threshold: float | None = DEFAULT_SCENE_CUT_THRESHOLD,
        scale: float = 1.0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.batch_size = int(batch_size)
        self.scene_cut_threshold = scene_cut_threshold
        self.scale = float(scale)
        self.last_scene_cuts: list[int] = []
        self.last_scene_cut_scores: list[float] = []

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> FrameInterpolator:
        """`path`: a directory holding ``flownet.pkl`` or the file itself. `kwargs` go to the constructor."""
        p = Path(path)
        if p.is_dir():
            p = p / "flownet.pkl"
        state = torch.load(p, map_location="cpu", weights_only=True)
        return cls(ifnet_from_state_dict(state), device=device, dtype=dtype, **kwargs)

    def scene_cut_scores(self, frames: np.ndarray) -> np.ndarray:
        """Per neighbouring pair: mean |luma_a - luma_b| in [0, 1] of the 32x32 area-downscaled frames."""
        if len(frames) < 2:
            return np.zeros(0, np.float32)
        weights = torch.tensor(_LUMA, dtype=torch.float32)
        small = []
        for i in range(0, len(frames), 16):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + 16])).float() / 255.0
            luma = (x @ weights).unsqueeze(1)  # [n, 1, H, W]
            small.append(F.interpolate(luma, size=_CUT_SIZE, mode="area"))
        s = torch.cat(small)
        return (s[1:] - s[:-1]).abs().mean(dim=(1, 2, 3)).numpy()

    def interpolate(self, frames: np.ndarray, factor: int) -> np.ndarray:
        """uint8 ``[F, H, W, 3]`` -> uint8 ``[factor * (F - 1) + 1, H, W, 3]``; factor 1 returns `frames` itself."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError("frames must be a uint8 array [F, H, W, 3]")
        factor = int(factor)
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.last_scene_cuts, self.last_scene_cut_scores = [], []
        if factor == 1 or len(frames) < 2:
            return frames
        n = len(frames)
        out = np.empty((factor * (n - 1) + 1, *frames.shape[1:]), np.uint8)
        out[::factor] = frames

        scores = self.scene_cut_scores(frames)
        self.last_scene_cut_scores = [float(s) for s in scores]
        thr = self.scene_cut_threshold
        cuts = [i for i, s in enumerate(scores) if thr is not None and s > thr]
        self.last_scene_cuts = cuts
        for i in cuts:  # no blending across a cut: repeat the earlier frame
            out[i * factor + 1 : (i + 1) * factor] = frames[i]

        cut_set = set(cuts)
        jobs = [(i, k) for i in range(n - 1) if i not in cut_set for k in range(1, factor)]
        if not jobs:
            return out
        with torch.inference_mode():
            dev_frames = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)  # uint8, uploaded once
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                idx = torch.tensor([i for i, _ in chunk], device=self.device)
                t = torch.tensor([k / factor for _, k in chunk], device=self.device, dtype=torch.float32)
                img0 = self._to_model(dev_frames[idx])
                img1 = self._to_model(dev_frames[idx + 1])
                y = self.model(img0, img1, t.to(self.dtype), scale=self.scale)
                y8 = (y.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for (i, k), frame in zip(chunk, y8):
                    out[i * factor + k] = frame
        return out

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> [B, 3, H, W] = uint8 / 255 in float32, then cast to the model dtype."""
        return (x.permute(0, 3, 1, 2).float() / 255.0).to(self.dtype).contiguous()
