"""Tiny CogVideoX models (2b-, 5b- and 1.5-like) written once per test session, and their stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("2b", "5b", "1.5")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from serve.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {v: write_tiny_model(v, root / f"tiny-{v}") for v in VARIANTS}


@pytest.fixture(scope="session")
def stages(tiny_models):
    """`stages(variant)` -> (TextEncodingStage, DenoisingStage, DecodingStage), loaded once each."""
    from serve.stages.decoding import DecodingStage
    from serve.stages.denoising import DenoisingStage
    from serve.stages.text_encoding import TextEncodingStage

    loaded = {}

    def get(variant: str):
        if variant not in loaded:
            path = str(tiny_models[variant])
            loaded[variant] = (
                TextEncodingStage.from_pretrained(path),
                DenoisingStage.from_pretrained(path),
                DecodingStage.from_pretrained(path),
            )
        return loaded[variant]

    return get
