"""Super-resolution of decoded uint8 frames with any single-image SR model that `spandrel` loads.

`SuperResolver.from_pretrained(path)` takes a weights file, or a local directory holding one (the caller
resolves Hugging Face ids and s3:// sources to a directory first), and lets spandrel identify the
architecture from the state dict's keys: Real-ESRGAN's RRDBNet x2/x4 (spandrel's "ESRGAN"), SRVGGNetCompact
(spandrel's "Compact", "RealESRGAN Compact"), SwinIR, SPAN, ... Only an `ImageModelDescriptor` whose
purpose is "SR" with 3 input and 3 output channels is accepted.

Arithmetic of `upscale` (exactly):

1. uint8 `[F, H, W, 3]` -> `torch.from_numpy` on the device -> NCHW -> cast to the model dtype -> `/ 255.0`
   (so the model sees `u / 255` in its dtype, range [0, 1]);
2. `descriptor(x)` (spandrel's call: pads to the architecture's size requirements, runs the model, clamps
   to [0, 1], crops the padding) in batches of `batch_size` frames, optionally tile by tile (below);
3. the output is cast to float32; when the requested factor is below the model's native scale (an x4
   model serving a 2x request) it is downscaled to `H*factor x W*factor` with
   `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`: the antialiased (PIL-compatible)
   bicubic keeps more of the detail the model produced than a box/area average, and with antialias it
   does not alias like plain bicubic sampling would. The resize runs on the whole frame, never per tile;
4. `clamp(0, 1) * 255`, `round()` (half to even), `-> uint8`, `[F, H*factor, W*factor, 3]`.

Tiling: when `tile` is set, or after an untiled batch raised `torch.OutOfMemoryError` (the CUDA cache is
emptied, that batch retried in tiles, `fallbacks` counted and that frame shape tiled from then on), each
frame is split into a grid of `ceil(H / tile) x ceil(W / tile)` near-equal core tiles of about `tile`
input pixels, their boundaries on the architecture's size grid (`size_requirements.multiple_of`: 4 px for
Real-ESRGAN x2, whose pixel unshuffle would otherwise see a shifted phase); every core is run with
`TILE_OVERLAP` (16, rounded up to that grid) input pixels of real context on each side (less at the
frame's edges), and only the core's part of the output is kept: the overlaps are cropped, not blended. A tile position is run for all frames of the batch at once. The result differs from the
untiled one only where a model's receptive field reaches past the 16 px of context.

The torchvision shim (`import_spandrel`): `import spandrel` loads its main registry, and two architectures
in it that this deployment never serves import torchvision at module level: LaMa (inpainting,
`torchvision.transforms.functional.InterpolationMode` and `rotate`) and RestoreFormer (face restoration,
`torchvision.transforms.functional.normalize`). No CPU torchvision build matches our torch, so spandrel
is installed with `--no-deps` (scripts/setup.sh, Dockerfile). When torchvision imports cleanly it is used
as it is; when it is missing or broken, `import_spandrel` registers a placeholder `torchvision` package
holding only those three names, whose functions raise. It is a dependency shim for those two unused
architectures, not a stand-in for anything the SR path runs: no SR architecture touches torchvision.
"""

from __future__ import annotations

import enum
import logging
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")

_SHIM_MESSAGE = "needs torchvision; this deployment serves super-resolution architectures only"


def _install_torchvision_shim() -> None:
    """Registers the placeholder `torchvision`, `torchvision.transforms`, `torchvision.transforms.functional`."""

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def rotate(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.rotate (spandrel's LaMa) {_SHIM_MESSAGE}")

    def normalize(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.normalize (spandrel's RestoreFormer) {_SHIM_MESSAGE}")

    doc = ("placeholder registered by serve.stages.super_resolution.import_spandrel: torchvision is not "
           "installed (or is broken); only the names spandrel's LaMa and RestoreFormer import exist, and they raise")
    tv = types.ModuleType("torchvision", doc)
    transforms = types.ModuleType("torchvision.transforms", doc)
    functional = types.ModuleType("torchvision.transforms.functional", doc)
    functional.InterpolationMode = InterpolationMode
    functional.rotate = rotate
    functional.normalize = normalize
    transforms.functional = functional
    tv.transforms = transforms
    for module in (tv, transforms, functional):
        module.__videogen_shim__ = True
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms
    sys.modules["torchvision.transforms.functional"] = functional


def import_spandrel():
    """`import spandrel`, with the torchvision shim (module docstring) only when torchvision does not import."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        # A broken build (e.g. "operator torchvision::nms does not exist") leaves half-imported modules behind.
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        logger.info("torchvision unavailable (%s: %s); registering the spandrel shim for LaMa/RestoreFormer",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        _install_torchvision_shim()
    import spandrel

    return spandrel


def resolve_weights_file(path: str | Path) -> Path:
    """`path` itself if it is a file; in a directory, its one weights file (a single `*.safetensors` is
    preferred over `.pth`/`.pt`/`.ckpt` copies of the same model). Anything ambiguous is a ValueError."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"super-resolution weights: {p} is neither a file nor a directory")
    candidates = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES)
    safetensors = [f for f in candidates if f.suffix.lower() == ".safetensors"]
    if len(safetensors) == 1:
        return safetensors[0]
    if len(safetensors) > 1 or len(candidates) > 1:
        names = ", ".join(f.name for f in (safetensors if len(safetensors) > 1 else candidates))
        raise ValueError(f"super-resolution weights: {p} holds several weights files ({names}); "
                         "point to one file or leave exactly one in the directory")
    if not candidates:
        raise ValueError(f"super-resolution weights: no {'/'.join('*' + s for s in WEIGHT_SUFFIXES)} file in {p}")
    return candidates[0]


def _grid(size: int, tile: int, multiple: int) -> list[int]:
    """Boundaries `0 = b0 < b1 < ... = size` of `ceil(size / tile)` near-equal cores, on multiples of `multiple`."""
    count = math.ceil(size / tile)
    inner = {min(size, multiple * round(i * size / count / multiple)) for i in range(1, count)}
    return sorted(inner - {0, size} | {0, size})


class SuperResolver:
    """One spandrel single-image SR model; `upscale` runs it over a clip's frames (module docstring)."""

    TILE_OVERLAP = 16
    FALLBACK_TILE = 256

    def __init__(self, descriptor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 tile: int | None = None, batch_size: int = 4, source: str | None = None) -> None:
        spandrel = import_spandrel()
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ValueError(f"super-resolution needs a single-image model; {source or 'the model'} is a "
                             f"{type(descriptor).__name__} ({descriptor.architecture.name})")
        what = f"{source or 'the model'} ({descriptor.architecture.name}, purpose {descriptor.purpose!r}, " \
               f"scale {descriptor.scale}, {descriptor.input_channels}->{descriptor.output_channels} channels)"
        if descriptor.purpose != "SR" or descriptor.scale < 2:
            raise ValueError(f"super-resolution needs an SR model; {what} is not one")
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ValueError(f"super-resolution needs an RGB -> RGB model; {what} is not one")
        if tile is not None and tile < 8:
            raise ValueError(f"tile must be at least 8 px, got {tile}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.requested_dtype = dtype
        # Set when the model cannot run in the requested dtype and runs in float32 instead.
        self.dtype_fallback: str | None = None
        if dtype == torch.float16 and not descriptor.supports_half:
            self.dtype_fallback = f"{descriptor.architecture.name} does not support float16"
        elif dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
            self.dtype_fallback = f"{descriptor.architecture.name} does not support bfloat16"
        elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype}")
        if self.dtype_fallback is not None:
            logger.warning("%s; running it in float32", self.dtype_fallback)
            dtype = torch.float32
        self.device = torch.device(device)
        self.dtype = dtype
        self.descriptor = descriptor.to(self.device, dtype).eval()
        self.scale: int = int(descriptor.scale)
        self.architecture: str = descriptor.architecture.name
        self.source = source
        self.tile = tile
        self.batch_size = batch_size
        # The tile size used after an out-of-memory fallback when `tile` is not set.
        self.fallback_tile = tile or self.FALLBACK_TILE
        # Frame shapes (H, W) whose untiled run ran out of memory: tiled straight away from then on.
        self.tiled_shapes: set[tuple[int, int]] = set()
        self.fallbacks = 0
        # Whether the last `upscale` ran (any batch) in tiles.
        self.last_tiled = False

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tile: int | None = None, batch_size: int = 4) -> SuperResolver:
        spandrel = import_spandrel()
        weights = resolve_weights_file(path)
        try:
            descriptor = spandrel.ModelLoader().load_from_file(weights)
        except spandrel.UnsupportedModelError as exc:
            raise ValueError(f"super-resolution weights: spandrel does not recognise the architecture of "
                             f"{weights} ({exc or 'unknown state dict'})") from exc
        return cls(descriptor, device=device, dtype=dtype, tile=tile, batch_size=batch_size, source=str(weights))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a float NCHW batch in [0, 1] (spandrel pads, clamps and crops)."""
        return self.descriptor(x)

    def _run_tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.scale
        # Tiles start on the architecture's size grid (e.g. 4 px for Real-ESRGAN x2, whose pixel unshuffle
        # groups 2x2 pixels): a tile shifted off that grid would see the frame in another phase.
        m = max(1, int(self.descriptor.size_requirements.multiple_of))
        ov = m * math.ceil(self.TILE_OVERLAP / m)
        tile = m * math.ceil(tile / m)
        ys, xs = _grid(h, tile, m), _grid(w, tile, m)
        out = x.new_empty((n, c, h * s, w * s))
        for i in range(len(ys) - 1):
            y0, y1 = ys[i], ys[i + 1]
            ey0, ey1 = max(0, y0 - ov), min(h, y1 + ov)
            for j in range(len(xs) - 1):
                x0, x1 = xs[j], xs[j + 1]
                ex0, ex1 = max(0, x0 - ov), min(w, x1 + ov)
                y = self._run(x[:, :, ey0:ey1, ex0:ex1])
                out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = y[:, :, (y0 - ey0) * s:(y1 - ey0) * s,
                                                            (x0 - ex0) * s:(x1 - ex0) * s]
        return out

    def _run_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        shape = (int(x.shape[2]), int(x.shape[3]))
        if self.tile is not None:
            return self._run_tiled(x, self.tile), True
        if shape in self.tiled_shapes:
            return self._run_tiled(x, self.fallback_tile), True
        oom: torch.OutOfMemoryError | None = None
        try:
            return self._run(x), False
        except torch.OutOfMemoryError as exc:
            oom = exc.with_traceback(None)  # the traceback's frames hold the failed attempt's tensors
        # Retried outside the `except` block, once the failed attempt's tensors are freed.
        self.fallbacks += 1
        self.tiled_shapes.add(shape)
        logger.warning("super-resolution of %s frames %dx%d ran out of memory; retrying in %d px tiles (%s)",
                       self.architecture, shape[1], shape[0], self.fallback_tile,
                       str(oom).splitlines()[0] if str(oom) else "OutOfMemoryError")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._run_tiled(x, self.fallback_tile), True

    @torch.inference_mode()
    def upscale(self, frames: np.ndarray, factor: int) -> np.ndarray:
        """uint8 `[F, H, W, 3]` -> uint8 `[F, H*factor, W*factor, 3]`; `factor` must divide the model's scale."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError("frames must be a uint8 array [F, H, W, 3], got "
                             f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}")
        factor = int(factor)
        if factor < 1 or factor > self.scale or self.scale % factor:
            raise ValueError(f"{self.architecture} x{self.scale} serves upscale factors that divide {self.scale}, "
                             f"not {factor}")
        n, h, w, _ = frames.shape
        out = np.empty((n, h * factor, w * factor, 3), dtype=np.uint8)
        tiled_any = False
        for start in range(0, n, self.batch_size):
            # torch.tensor copies: Ray hands over read-only zero-copy arrays.
            x = torch.tensor(frames[start:start + self.batch_size], device=self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype) / 255.0
            y, tiled = self._run_batch(x)
            tiled_any |= tiled
            y = y.float()
            if factor != self.scale:
                y = F.interpolate(y, size=(h * factor, w * factor), mode="bicubic", align_corners=False,
                                  antialias=True)
            y = (y.clamp(0.0, 1.0) * 255).round().to(torch.uint8)
            out[start:start + len(x)] = y.permute(0, 2, 3, 1).cpu().numpy()
        self.last_tiled = tiled_any
        return out
