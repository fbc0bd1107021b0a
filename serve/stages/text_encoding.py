"""Stage 1 of 3: prompt text -> T5 embeddings (`PromptEmbeddings`), handed on to the denoiser.

Reproduces `CogVideoXPipeline.encode_prompt` for one prompt and one video: pad/truncate to
`max_sequence_length` tokens, no attention mask (the padding positions carry real embeddings that
the transformer was trained with), and `""` as the negative prompt when none is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from serve.stages.types import PromptEmbeddings

logger = logging.getLogger(__name__)


class TextEncodingStage:
    """Owns the tokenizer and the T5 encoder of one model; nothing else of the model is loaded."""

    def __init__(self, tokenizer, text_encoder, device: str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        # The empty negative prompt's embedding is fixed per model; most requests use it.
        self._empty_negative: dict[int, np.ndarray] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> TextEncodingStage:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", revision=revision, dtype=dtype)
        return cls(tokenizer, text_encoder.to(device).eval(), device)

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        do_cfg: bool,
        max_sequence_length: int = 226,
    ) -> PromptEmbeddings:
        positive = self._embed(prompt, max_sequence_length)
        negative = None
        if do_cfg:
            if negative_prompt:
                negative = self._embed(negative_prompt, max_sequence_length)
            else:
                if max_sequence_length not in self._empty_negative:
                    cached = self._embed("", max_sequence_length)
                    cached.flags.writeable = False  # shared by every request: nobody may edit it
                    self._empty_negative[max_sequence_length] = cached
                negative = self._empty_negative[max_sequence_length]
        return PromptEmbeddings(positive=positive, negative=negative)

    def warmup(self, shapes: Sequence[tuple[int, int, int]] | None = None,
               max_sequence_length: int = 226) -> dict[str, float]:
        """Encode once (the prompt is always padded to `max_sequence_length` tokens, so the video
        shapes do not matter); also computes the cached empty negative prompt."""
        t0 = time.perf_counter()
        self.encode("warm-up", None, do_cfg=True, max_sequence_length=max_sequence_length)
        return {"text_encoder": time.perf_counter() - t0}

    @torch.inference_mode()
    def _embed(self, text: str, max_sequence_length: int) -> np.ndarray:
        """T5 hidden states `[1, max_sequence_length, d_model]` as float32 CPU numpy."""
        input_ids = self.tokenizer(
            [text],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        if len(self.tokenizer(text).input_ids) > max_sequence_length:
            logger.warning("prompt truncated to %d tokens", max_sequence_length)
        hidden = self.text_encoder(input_ids.to(self.device))[0]
        # float32 holds bf16/fp16 exactly, so the denoiser can cast back without loss.
        return hidden.float().cpu().numpy()
