"""Tiny random-initialised CogVideoX checkpoints for CPU tests and local development.

Sits before everything else in the data flow: it writes a model directory in the standard diffusers
layout that the stages (serve/stages/) and diffusers' own `CogVideoXPipeline` (the image-to-video
variants: `CogVideoXImageToVideoPipeline`) both load. The variants mirror the *structure* of the real
checkpoints (scheduler class, positional embeddings, temporal patching, VAE scaling factor, image
latents as extra input channels, the ofs embedding) at a size that runs a full request in seconds on a CPU.

The tiny 5b-i2v, like CogVideoX-5b-I2V, has learned positional embeddings fitted to one size: it makes
only 48x32 (its `sample_width`/`sample_height` in latents), as the real one makes only 720x480. The tiny
1.5-i2v makes any size whose sides are at most 128 px (its rotary grid), as the real one's 300x300 latents
cover the sizes CogVideoX1.5-5B-I2V is trained for.

    python -m serve.models.tiny --variant 2b --out ./models/tiny-2b
    python -m serve.models.tiny --all --out-root ./models
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Literal

Variant = Literal["2b", "5b", "1.5", "5b-i2v", "1.5-i2v"]
VARIANTS: tuple[Variant, ...] = ("2b", "5b", "1.5", "5b-i2v", "1.5-i2v")
# the text-to-video variant each image-to-video one is built on (its scheduler and VAE)
_I2V_BASE: dict[str, Variant] = {"5b-i2v": "5b", "1.5-i2v": "1.5"}
# the tiny 5b-i2v's only size, in pixels (its learned positional embeddings are fitted to it)
TINY_5B_I2V_SIZE = (48, 32)

_TEXT_DIM = 32  # T5 d_model == transformer text_embed_dim

# Scheduler configs of the real checkpoints (THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B); only
# snr_shift_scale differs between them besides the class.
_SCHEDULER_BASE = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}

# A few frequent words so prompts do not fall apart into single characters; every printable ASCII
# character is also a piece (with and without the "▁" word-start marker), so any ASCII prompt
# tokenizes without <unk>.
_WORDS = (
    "the a an and of in on at to with is are was for from by as it its this that over under into "
    "cat dog panda bird fish horse car city street forest sea ocean sky sun moon night day light "
    "red green blue white black golden small big tiny old young slow fast walking running flying "
    "sitting playing video camera shot close up view scene beautiful cinematic"
).split()


def _tokenizer_vocab() -> list[tuple[str, float]]:
    # T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces. Unigram picks the segmentation with the
    # highest summed log-probability, so whole words (-5) beat their characters (-8 each).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    chars = [c for c in string.printable if not c.isspace()]
    vocab += [(c, -8.0) for c in chars]
    vocab += [("▁" + c, -7.5) for c in chars]
    vocab += [("▁" + w, -5.0) for w in _WORDS if len(w) > 1]
    return vocab


def _transformer_config(variant: Variant) -> dict:
    base = _I2V_BASE.get(variant, variant)
    config = {
        "num_attention_heads": 2,
        "attention_head_dim": 16,  # rotary embeddings need a multiple of 16
        "in_channels": 16,
        "out_channels": 16,
        "time_embed_dim": 16,
        "text_embed_dim": _TEXT_DIM,
        "num_layers": 2,  # cache hooks (FirstBlockCache & co.) need at least two blocks
        "sample_width": 8,  # latent units: 64 px
        "sample_height": 8,
        "sample_frames": 9,
        "patch_size": 2,
        "temporal_compression_ratio": 4,
        "max_text_seq_length": 226,  # sin-cos (2b) positions must match the 226-token prompt
        "use_rotary_positional_embeddings": base != "2b",
    }
    if base == "1.5":
        # CogVideoX1.5-5B (text-to-video): temporal patches of 2 latent frames, no patch bias.
        # Its ofs embedding exists only in the image-to-video model (CogVideoXPipeline never
        # passes `ofs`), so ofs_embed_dim stays None as in the real T2V config.
        config.update(patch_size_t=2, patch_bias=False, sample_frames=17)
    if variant in _I2V_BASE:
        # noise latents and image latents joined on the channel axis; the prediction is for the noise only
        config.update(in_channels=32, out_channels=16)
    if variant == "5b-i2v":
        # CogVideoX-5b-I2V adds learned positions (saved with the weights) to its rotary ones; diffusers refuses any
        # latent size but sample_height x sample_width, and at any other frame count than sample_frames it adds
        # freshly computed sin-cos positions instead of the stored ones
        width, height = TINY_5B_I2V_SIZE
        config.update(use_learned_positional_embeddings=True, sample_width=width // 8, sample_height=height // 8,
                      sample_frames=9)
    if variant == "1.5-i2v":
        # the ofs embedding is added to the time embedding, so its width is time_embed_dim (512 both in the real
        # config); the rotary grid is sliced from sample_height x sample_width patches (real: 300x300 latents),
        # which bounds the sizes this model makes: 16 latents = 128 px
        config.update(ofs_embed_dim=config["time_embed_dim"], sample_width=16, sample_height=16, sample_frames=17)
    return config


def _vae_config(variant: Variant) -> dict:
    base = _I2V_BASE.get(variant, variant)
    return {
        # Four blocks: the pipelines derive the spatial factor as 2 ** (len(blocks) - 1) == 8.
        "block_out_channels": (8, 8, 8, 8),
        "latent_channels": 16,
        "layers_per_block": 1,
        "norm_num_groups": 2,
        "temporal_compression_ratio": 4,
        # As the real VAEs: tiling splits frames above half these sizes, and only tiles of these
        # proportions add up to the right output size (the tile stride is rounded in latents).
        "sample_height": 480,
        "sample_width": 720,
        "scaling_factor": 1.15258426 if base == "2b" else 0.7,
        # The 1.5 VAEs store inverted image-latent scaling (used by image-to-video only): image latents are
        # divided by scaling_factor, not multiplied.
        "invert_scale_latents": base == "1.5",
    }


def build_tiny_pipeline(variant: Variant, seed: int = 0):
    """Construct (in memory) a tiny `CogVideoXPipeline` (`CogVideoXImageToVideoPipeline` for the image-to-video
    variants) of the given variant."""
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS} but is {variant!r}.")

    tokenizer = T5Tokenizer(vocab=_tokenizer_vocab(), extra_ids=0)
    # fork_rng: seed module init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=_TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ).eval()
        torch.manual_seed(seed + 1)
        transformer = CogVideoXTransformer3DModel(**_transformer_config(variant)).eval()
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLCogVideoX(**_vae_config(variant)).eval()

    if variant == "2b":
        scheduler = CogVideoXDDIMScheduler(**_SCHEDULER_BASE, snr_shift_scale=3.0)
    else:
        scheduler = CogVideoXDPMScheduler(**_SCHEDULER_BASE, snr_shift_scale=1.0)
    pipeline_class = CogVideoXImageToVideoPipeline if variant in _I2V_BASE else CogVideoXPipeline
    return pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def write_tiny_model(variant: Variant, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny CogVideoX model of `variant` to `out_dir` (diffusers layout); returns `out_dir`."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(variant, seed).save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(variant: Variant, out_dir: Path, seed: int = 0) -> Path:
    """Like `write_tiny_model`, but a no-op when `out_dir` already holds a model."""
    out_dir = Path(out_dir)
    if not (out_dir / "model_index.json").is_file():
        write_tiny_model(variant, out_dir, seed)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=VARIANTS, help="write one variant to --out")
    which.add_argument("--all", action="store_true", help="write every variant to --out-root/tiny-<variant>")
    parser.add_argument("--out", type=Path, help="output directory (with --variant)")
    parser.add_argument("--out-root", type=Path, help="parent directory (with --all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.all:
        if args.out_root is None:
            parser.error("--all needs --out-root")
        targets = [(v, args.out_root / f"tiny-{v}") for v in VARIANTS]
    else:
        if args.out is None:
            parser.error("--variant needs --out")
        targets = [(args.variant, args.out)]
    for variant, out in targets:
        write_tiny_model(variant, out, args.seed)
        print(f"wrote tiny CogVideoX {variant} to {out}")


if __name__ == "__main__":
    main()
