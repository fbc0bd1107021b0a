"""Super-resolution of decoded frames (serve/stages/super_resolution.py) with tiny spandrel models.

The tiny models (serve/models/tiny_enhance.py `write_tiny_sr`) are the real architectures in the real
files' key layout, loaded through spandrel's detection as real weights are. Tolerances, measured with
these models: tiled vs untiled differs by at most ~4e-7 in float (the RRDB trunk's reach past 16 px
of context is negligible at init) and not at all in uint8; the tests allow 1e-5 in float and 1 uint8 level.
Batch size 1 vs 4 is compared in float before rounding (1e-6) and in uint8 (at most 1 level, where a value
sits on a rounding boundary).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve.stages.super_resolution import (
    SuperResolver,
    import_spandrel,
    resolve_weights_file,
)

REPO = Path(__file__).resolve().parents[2]
MODELS = [("esrgan", 2), ("esrgan", 4), ("compact", 2), ("compact", 4)]


@pytest.fixture(scope="module")
def sr_models(tmp_path_factory) -> dict[tuple[str, int], Path]:
    from serve.models.tiny_enhance import write_tiny_sr

    root = tmp_path_factory.mktemp("tiny-sr")
    return {(a, s): write_tiny_sr(root / f"{a}-x{s}", arch=a, scale=s) for a, s in MODELS}


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _direct(path: Path, frames: np.ndarray, batch: int) -> torch.Tensor:
    """spandrel's own descriptor (loaded separately) on the frames in batches: float NCHW in [0, 1]."""
    spandrel = import_spandrel()
    descriptor = spandrel.ModelLoader().load_from_file(resolve_weights_file(path)).eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return torch.cat([descriptor(x[i:i + batch]) for i in range(0, len(x), batch)])


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    return (y.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("arch,scale", MODELS)
def test_matches_spandrel_applied_directly(sr_models, arch, scale):
    path = sr_models[arch, scale]
    frames = _frames(6, 32, 48)
    sr = SuperResolver.from_pretrained(str(path), batch_size=4)
    assert (sr.scale, sr.dtype) == (scale, torch.float32)
    assert sr.architecture == ("ESRGAN" if arch == "esrgan" else "RealESRGAN Compact")
    out = sr.upscale(frames, scale)
    assert out.shape == (6, 32 * scale, 48 * scale, 3) and out.dtype == np.uint8
    # same batching (4 + 2): bit for bit
    np.testing.assert_array_equal(out, _to_uint8(_direct(path, frames, 4)))
    assert not sr.last_tiled
    # batch 1 vs 4: float before rounding within 1e-6; uint8 at most one level apart
    assert float((_direct(path, frames, 1) - _direct(path, frames, 4)).abs().max()) <= 1e-6
    out1 = SuperResolver.from_pretrained(str(path), batch_size=1).upscale(frames, scale)
    assert np.abs(out1.astype(int) - out).max() <= 1


@pytest.mark.parametrize("arch", ["esrgan", "compact"])
def test_factors(sr_models, arch):
    frames = _frames(3, 32, 48, seed=1)
    x2 = SuperResolver.from_pretrained(str(sr_models[arch, 2]))
    assert x2.upscale(frames, 2).shape == (3, 64, 96, 3)
    x4 = SuperResolver.from_pretrained(str(sr_models[arch, 4]))
    assert x4.upscale(frames, 4).shape == (3, 128, 192, 3)
    # an x4 model serving 2x: its output downscaled (antialiased bicubic) before rounding
    down = x4.upscale(frames, 2)
    assert down.shape == (3, 64, 96, 3)
    y4 = _direct(sr_models[arch, 4], frames, 4)
    expected = F.interpolate(y4, size=(64, 96), mode="bicubic", align_corners=False, antialias=True)
    np.testing.assert_array_equal(down, _to_uint8(expected))
    for sr, factor in ((x4, 3), (x2, 3), (x2, 4), (x4, 8), (x4, 0)):
        with pytest.raises(ValueError, match="serves upscale factors that divide"):
            sr.upscale(frames, factor)


@pytest.mark.parametrize("arch,scale", [("esrgan", 2), ("esrgan", 4), ("compact", 2)])
@pytest.mark.parametrize("size", [(32, 48), (37, 53)])
def test_tiled_equals_untiled(sr_models, arch, scale, size):
    path = sr_models[arch, scale]
    frames = _frames(2, *size, seed=2)
    untiled = SuperResolver.from_pretrained(str(path))
    tiled = SuperResolver.from_pretrained(str(path), tile=16)  # 16 does not divide 37, 53 or 48
    a, b = untiled.upscale(frames, scale), tiled.upscale(frames, scale)
    assert tiled.last_tiled and not untiled.last_tiled
    assert b.shape == a.shape
    assert np.abs(a.astype(int) - b).max() <= 1
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        ya, yb = untiled._run(x), tiled._run_tiled(x, 16)
    assert float((ya - yb).abs().max()) <= 1e-5


def test_out_of_memory_falls_back_to_tiles(sr_models, monkeypatch):
    path = sr_models["esrgan", 2]
    frames = _frames(5, 48, 64, seed=3)
    sr = SuperResolver.from_pretrained(str(path), batch_size=4)
    sr.fallback_tile = 12  # tiles of at most 12 + 2 * 16 px: never the whole 48x64 frame
    run = sr._run
    full_calls = []

    def run_or_oom(x):
        if tuple(x.shape[-2:]) == (48, 64):
            full_calls.append(tuple(x.shape))
            if len(full_calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return run(x)

    monkeypatch.setattr(sr, "_run", run_or_oom)
    out = sr.upscale(frames, 2)
    tiled = SuperResolver.from_pretrained(str(path), tile=12, batch_size=4)
    np.testing.assert_array_equal(out, tiled.upscale(frames, 2))
    assert sr.fallbacks == 1 and sr.last_tiled and sr.tiled_shapes == {(48, 64)}
    assert full_calls == [(4, 3, 48, 64)]  # the second batch went straight to tiles
    # the next call tiles that shape directly; another shape still runs untiled
    np.testing.assert_array_equal(sr.upscale(frames[:2], 2), out[:2])
    assert sr.fallbacks == 1 and sr.last_tiled and len(full_calls) == 1
    sr.upscale(_frames(1, 24, 40), 2)
    assert not sr.last_tiled


def test_refuses_what_is_not_one_sr_model(sr_models, tmp_path):
    from safetensors.torch import save_file

    from serve.models.tiny_enhance import write_tiny_sr

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    save_file({"encoder.proj.weight": torch.randn(4, 4), "encoder.proj.bias": torch.zeros(4)},
              str(unknown / "model.safetensors"))
    with pytest.raises(ValueError, match="spandrel does not recognise the architecture"):
        SuperResolver.from_pretrained(str(unknown))
    # a model spandrel knows, but x1 (purpose "Restoration"): not super-resolution
    with pytest.raises(ValueError, match="needs an SR model.*Restoration"):
        SuperResolver.from_pretrained(str(write_tiny_sr(tmp_path / "x1", arch="compact", scale=1)))
    # two weights files: ambiguous, and the message lists them
    two = tmp_path / "two"
    two.mkdir()
    src = next(sr_models["esrgan", 2].glob("*.safetensors"))
    for name in ("a.safetensors", "b.safetensors"):
        (two / name).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=r"several weights files \(a.safetensors, b.safetensors\)"):
        SuperResolver.from_pretrained(str(two))
    (two / "b.safetensors").rename(two / "b.pth")  # one safetensors beside a .pth: the safetensors
    assert resolve_weights_file(two) == two / "a.safetensors"
    (two / "a.safetensors").rename(two / "a.pt")
    with pytest.raises(ValueError, match=r"several weights files \(a.pt, b.pth\)"):
        SuperResolver.from_pretrained(str(two))
    with pytest.raises(ValueError, match="no .*safetensors"):
        SuperResolver.from_pretrained(str(tmp_path / "x1" / ".."))  # holds only directories


def test_dtype_falls_back_when_unsupported(sr_models):
    spandrel = import_spandrel()
    descriptor = spandrel.ModelLoader().load_from_file(resolve_weights_file(sr_models["compact", 2]))
    descriptor.supports_half = False
    sr = SuperResolver(descriptor, dtype=torch.float16)
    assert sr.dtype == torch.float32 and "float16" in sr.dtype_fallback
    assert next(sr.descriptor.model.parameters()).dtype == torch.float32


_SHIM_CHECK = """
import importlib.util, sys
from serve.stages.super_resolution import import_spandrel
spandrel = import_spandrel()
assert hasattr(spandrel, "ModelLoader")
tv = sys.modules["torchvision"]
assert getattr(tv, "__videogen_shim__", False), tv
from torchvision.transforms.functional import InterpolationMode, normalize, rotate
assert InterpolationMode.BILINEAR.value == "bilinear"
for fn in (rotate, normalize):
    try:
        fn(None)
    except RuntimeError as exc:
        assert "serves super-resolution architectures only" in str(exc)
    else:
        raise AssertionError(fn)
print("ok")
"""


def _python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path or ""), str(REPO)) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# a machine without torchvision, whatever this one has: its import fails as a missing package's does
_NO_TORCHVISION = """
import sys
class _NoTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorchvision())
"""


def test_import_spandrel_without_torchvision():
    # (in a fresh interpreter: this one may hold the shim already)
    # plain `import spandrel` needs torchvision (LaMa, RestoreFormer import it); import_spandrel does not
    plain = _python(_NO_TORCHVISION + "import spandrel")
    assert plain.returncode != 0 and "torchvision" in plain.stderr
    done = _python(_NO_TORCHVISION + _SHIM_CHECK)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_import_spandrel_with_a_broken_torchvision(tmp_path):
    # a torchvision whose import fails half way (as PyPI's 0.28 does against this torch) is purged and shimmed
    pkg = tmp_path / "torchvision"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(
        "import torchvision.ops\nraise RuntimeError('operator torchvision::nms does not exist')\n")
    done = _python(_SHIM_CHECK + "assert 'torchvision.ops' not in sys.modules\n", extra_path=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
