"""Tiny model writer: layout, determinism, idempotence."""

from __future__ import annotations

import json

from serve.models.tiny import ensure_tiny_model, main


def _weights(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*.safetensors")}


def test_layout_and_variant_structure(tiny_models):
    for variant, path in tiny_models.items():
        index = json.loads((path / "model_index.json").read_text())
        assert {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"} <= index.keys()
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        assert transformer["max_text_seq_length"] == 226
        assert transformer["use_rotary_positional_embeddings"] == (variant != "2b")
        assert transformer["patch_size_t"] == (2 if variant == "1.5" else None)
        vae = json.loads((path / "vae" / "config.json").read_text())
        assert vae["scaling_factor"] == (1.15258426 if variant == "2b" else 0.7)
        assert index["scheduler"][1] == ("CogVideoXDDIMScheduler" if variant == "2b" else "CogVideoXDPMScheduler")
        assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 10 * 2**20


def test_cli_is_deterministic_and_ensure_is_idempotent(tiny_models, tmp_path):
    out = tmp_path / "again"
    main(["--variant", "2b", "--out", str(out)])
    assert _weights(out) == _weights(tiny_models["2b"])

    mtime = (out / "model_index.json").stat().st_mtime_ns
    ensure_tiny_model("2b", out)
    assert (out / "model_index.json").stat().st_mtime_ns == mtime
