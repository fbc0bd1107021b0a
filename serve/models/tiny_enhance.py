"""Tiny random-initialised enhancement models (frame interpolation, ...) for CPU tests and local development.

Each writer saves a checkpoint in the layout of the published weights, so the stage loads it through the
same code path as the real files.

    write_tiny_rife(out_dir)  ->  out_dir/flownet.pkl, a Practical-RIFE 4.25 IFNet at small widths
"""

from __future__ import annotations

from pathlib import Path

# Small widths for the tiny RIFE: the published 4.25 layout (five flow blocks + encode Head) at a
# fraction of its channels (192, 128, 96, 64, 32 and a 16-channel Head).
TINY_RIFE_BLOCK_WIDTHS = (16, 16, 8, 8, 8)
TINY_RIFE_HEAD_CHANNELS = 4


def write_tiny_rife(out_dir, seed: int = 0) -> Path:
    """Write a random IFNet (Practical-RIFE 4.25 key names, tiny widths) as `out_dir/flownet.pkl`.

    The state dict is saved with the ``module.`` prefix the published `flownet.pkl` files carry (they are
    saved from a DistributedDataParallel-wrapped IFNet). Returns `out_dir`.
    """
    import torch

    from serve.stages.interpolation import IFNet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = IFNet(TINY_RIFE_BLOCK_WIDTHS, TINY_RIFE_HEAD_CHANNELS)
    finally:
        torch.random.set_rng_state(gen_state)
    state = {f"module.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / "flownet.pkl")
    return out


# --- tiny single-image super-resolution models (serve/stages/super_resolution.py) -------------------------

# The scales each tiny SR architecture is written in: RRDBNet as RealESRGAN_x2plus / x4plus; Compact x1..x4
# (x1 is "Restoration" to spandrel, not SR: the tests use it as a model to refuse).
_SR_SCALES = {"esrgan": (2, 4), "compact": (1, 2, 3, 4)}
_TINY_SR_BLOCKS = 1


def _esrgan_to_basicsr_keys(state: dict, num_blocks: int) -> dict:
    """spandrel's RRDBNet state dict (old ESRGAN "model.N" names) -> basicsr `RRDBNet` names, the layout
    RealESRGAN_x4plus.pth / RealESRGAN_x2plus.pth hold (under "params_ema"); spandrel maps them back."""
    import re

    # spandrel's old layout: model.0 conv_first, model.1.sub.<b>.RDB<r>.conv<c>.0 the trunk,
    # model.1.sub.<num_blocks> conv_body, model.3 / model.6 the two x2 upsampling convs, model.8 conv_hr,
    # model.10 conv_last
    fixed = {"model.0": "conv_first", f"model.1.sub.{num_blocks}": "conv_body", "model.3": "conv_up1",
             "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0", module)
        if m:
            new = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}"
        elif module in fixed:
            new = fixed[module]
        else:
            raise KeyError(f"unexpected RRDBNet key {key}")
        out[f"{new}.{kind}"] = value.detach().clone().contiguous()
    return out


def write_tiny_sr(out_dir, arch: str = "esrgan", scale: int = 2, seed: int = 0) -> Path:
    """Write a tiny random-initialised single-image SR model to `out_dir/<name>.safetensors`; returns `out_dir`.

    `arch` "esrgan": Real-ESRGAN's RRDBNet (8 features, 1 RRDB block, growth 32), x2 or x4, in the key
    layout of RealESRGAN_x2plus / RealESRGAN_x4plus (basicsr names: `conv_first`, `body.<b>.rdb<r>.conv<c>`,
    `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`; x2 is the x4 network behind a pixel
    unshuffle, so its `conv_first` takes 12 channels). `arch` "compact": SRVGGNetCompact (8 features,
    2 convs, PReLU, `body.<n>` keys as realesr-general-x4v3 / realesr-animevideov3 have them), x1..x4.
    The networks are built with spandrel's own classes and loaded back by spandrel's detection, the path
    real weights take. The last conv is rescaled (and, for RRDBNet, biased to 0.5) so outputs mostly sit
    inside [0, 1] (spandrel clamps) with a visible spread: differences between code paths show. The global
    torch RNG is left as it was.
    """
    import torch
    from safetensors.torch import save_file

    from serve.stages.super_resolution import import_spandrel

    import_spandrel()
    if arch not in _SR_SCALES:
        raise ValueError(f"arch must be one of {sorted(_SR_SCALES)}, got {arch!r}")
    if scale not in _SR_SCALES[arch]:
        raise ValueError(f"{arch} tiny models come in scales {_SR_SCALES[arch]}, got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model, name, last = _build_tiny_sr(arch, scale)
    finally:
        torch.random.set_rng_state(gen_state)
    state = model.state_dict()
    with torch.no_grad():
        # RRDBNet maps straight to the image: centre it, with a spread of ~0.1; Compact adds a small
        # residual to the upsampled input
        state[f"{last}.weight"].mul_(8.0 if arch == "esrgan" else 0.25)
        state[f"{last}.bias"].fill_(0.5 if arch == "esrgan" else 0.0)
    if arch == "esrgan":
        state = _esrgan_to_basicsr_keys(state, num_blocks=_TINY_SR_BLOCKS)
    else:
        state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    save_file(state, str(out_dir / f"{name}.safetensors"))
    return out_dir


def _build_tiny_sr(arch: str, scale: int):
    """(the spandrel module, the file's name, the last conv's key prefix in the module's state dict)."""
    if arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        shuffle = 4 // scale  # 1 (x4) or 2 (x2): basicsr's x2 RRDBNet unshuffles by 2, then upsamples x4
        model = ESRGAN(in_nc=3 * shuffle * shuffle, out_nc=3, num_filters=8, num_blocks=_TINY_SR_BLOCKS, scale=4,
                       shuffle_factor=shuffle if shuffle > 1 else None)
        return model, f"tiny-RealESRGAN_x{scale}plus", "model.10"
    else:
        from spandrel.architectures.Compact import Compact

        model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
        return model, f"tiny-realesr-compact-x{scale}", f"body.{len(model.body) - 1}"


def ensure_tiny_enhance(out_dir: Path) -> Path:
    """The tiny weights a local config names by directory (`tiny-sr-x2`, `tiny-sr-x4`, `tiny-sr-compact-x2`,
    `tiny-rife`), written if missing; anything else is left to its real source."""
    out_dir = Path(out_dir)
    name = out_dir.name
    if out_dir.is_dir() and any(out_dir.iterdir()):
        return out_dir
    if name == "tiny-rife":
        return write_tiny_rife(out_dir)
    for arch, prefix in (("compact", "tiny-sr-compact-x"), ("esrgan", "tiny-sr-x")):
        if name.startswith(prefix) and name[len(prefix):] in ("2", "4"):
            return write_tiny_sr(out_dir, arch=arch, scale=int(name[len(prefix):]))
    raise ValueError(f"{out_dir} is not a tiny enhancement model name (tiny-sr-x2, tiny-sr-x4, tiny-sr-compact-x2, "
                     f"tiny-rife)")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny random SR and RIFE models (in the real layouts).")
    parser.add_argument("--out-root", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    for name in ("tiny-sr-x2", "tiny-sr-x4", "tiny-rife"):
        print(ensure_tiny_enhance(args.out_root / name))


if __name__ == "__main__":
    main()
