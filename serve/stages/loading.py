"""Where a stage runs: resolve device, dtype and the local path of the model for a stage replica."""

from __future__ import annotations

import logging

from serve.config import AppConfig, ModelAppArgs, ModelConfig, S3Config
from serve.config.accel import AccelConfig

log = logging.getLogger(__name__)


def resolve_device(model: ModelConfig) -> str:
    import torch

    if model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if model.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {model.device!r} but CUDA is not available on this replica")
    return model.device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def weights_dtype(model: ModelConfig, device: str):
    """The preset's dtype on a GPU; float32 on a CPU (half precision on CPU is slow and lossy)."""
    return torch_dtype(model.resolved_dtype() if device != "cpu" else (model.dtype or "float32"))


def text_encoder_dtype(model: ModelConfig, device: str):
    # random/real T5 in fp16 overflows; bf16 is the safe half-precision choice on GPU
    default = "bfloat16" if device != "cpu" else "float32"
    return torch_dtype(model.text_encoder_dtype or default)


def local_model_path(model: ModelConfig, s3: S3Config) -> str:
    """A local directory (or hub id) for `from_pretrained`; s3:// sources are downloaded once."""
    from serve.models.source import resolve_model_source

    client = None
    if model.source.startswith("s3://"):
        from serve.storage import Storage

        client = Storage.from_config(s3).client
    return resolve_model_source(model.source, model.cache_dir, s3_client=client, revision=model.revision)


def load_stage(stage_cls, args: ModelAppArgs | AppConfig, *, text_encoder: bool = False, **stage_kwargs):
    """`stage_cls.from_pretrained` of `args.model` on this replica's device, in the stage's dtype.

    `args`: the model application's `args` (or an `AppConfig`, its default model). `stage_kwargs` go to
    `from_pretrained` as they are (e.g. `accel=` for the denoiser).
    """
    model = args.model
    device = resolve_device(model)
    dtype = text_encoder_dtype(model, device) if text_encoder else weights_dtype(model, device)
    path = local_model_path(model, args.s3)
    log.info("loading %s from %s on %s (%s)", stage_cls.__name__, path, device, dtype)
    return stage_cls.from_pretrained(path, device=device, dtype=dtype, revision=model.revision,
                                     **stage_kwargs)


def warmup_shapes(model: ModelConfig, accel: AccelConfig) -> list[tuple[int, int, int]]:
    """`(num_frames, height, width)` to warm up: the configured ones, else the preset's default video."""
    if accel.warmup_shapes:
        return [tuple(shape) for shape in accel.warmup_shapes]
    preset = model.preset()
    return [(preset.num_frames, preset.height, preset.width)]
