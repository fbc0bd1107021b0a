"""Attention backend for the denoiser's transformer: which SDPA kernel CogVideoX's attention uses.

Part of the denoising stage's setup (`serve.stages.accel.apply_accel`). CogVideoX's stock processor calls
`F.scaled_dot_product_attention` directly, so diffusers' `set_attention_backend` has no effect on it;
this processor runs the same code inside `torch.nn.attention.sdpa_kernel([...])` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from serve.stages.types import AccelUnavailable

SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class SdpaBackendCogVideoXAttnProcessor(CogVideoXAttnProcessor2_0):
    """`CogVideoXAttnProcessor2_0` with its SDPA call pinned to one kernel."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        if backend not in SDPA_BACKENDS:
            raise ValueError(f"attention backend must be one of {sorted(SDPA_BACKENDS)}, got {backend!r}")
        self.backend = backend
        self._kernels = [SDPA_BACKENDS[backend]]

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        with sdpa_kernel(self._kernels):
            return super().__call__(attn, hidden_states, encoder_hidden_states,
                                    attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)


def probe_backend(backend: str, device, dtype: torch.dtype, heads: int, head_dim: int) -> None:
    """Raise `AccelUnavailable` when `backend` has no kernel for this device, dtype and head size."""
    q = torch.zeros(1, heads, 8, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPA_BACKENDS[backend]]), torch.inference_mode():
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        raise AccelUnavailable(
            f"attention_backend={backend!r} has no kernel for {torch.device(device)} {dtype} with head_dim="
            f"{head_dim}: {exc}".splitlines()[0]) from None


def install_attention_backend(transformer, backend: str) -> None:
    """Set every attention processor of a CogVideoX transformer to `backend` ('sdpa': the stock one)."""
    if backend == "sdpa":
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
        return
    config = transformer.config
    probe_backend(backend, transformer.device, transformer.dtype, config.num_attention_heads,
                  config.attention_head_dim)
    transformer.set_attn_processor(SdpaBackendCogVideoXAttnProcessor(backend))
