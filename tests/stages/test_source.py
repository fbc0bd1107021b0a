"""Resolving model sources: local directories, Hugging Face ids, and S3 prefixes (with moto)."""

from __future__ import annotations

import pytest

from serve.models.source import COMPLETE_MARKER, ModelSourceError, resolve_model_source


def test_local_model_dir_is_returned_as_is(tiny_models, tmp_path):
    path = str(tiny_models["2b"])
    assert resolve_model_source(path, cache_dir=str(tmp_path)) == path


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope"), cache_dir=str(tmp_path))


def test_local_dir_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="model_index.json"):
        resolve_model_source(str(tmp_path / "empty"), cache_dir=str(tmp_path))


def test_hf_id_is_passed_through(tmp_path):
    assert resolve_model_source("THUDM/CogVideoX-2b", cache_dir=str(tmp_path)) == "THUDM/CogVideoX-2b"


@pytest.mark.parametrize("source", ["", "s3://", "s3://bucket", "s3:///prefix", "not a model id!"])
def test_malformed_sources(source, tmp_path):
    with pytest.raises(ModelSourceError):
        resolve_model_source(source, cache_dir=str(tmp_path))


def test_s3_prefix_downloads_once(tiny_models, tmp_path):
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="videogen-models")
        model = tiny_models["2b"]
        files = sorted(p for p in model.rglob("*") if p.is_file())
        for p in files:
            s3.upload_file(str(p), "videogen-models", f"tiny-2b/{p.relative_to(model).as_posix()}")
        # A neighbour sharing the prefix's first characters must not be downloaded.
        s3.put_object(Bucket="videogen-models", Key="tiny-2b-other/stray.txt", Body=b"x")

        cache = tmp_path / "cache"
        local = resolve_model_source("s3://videogen-models/tiny-2b/", cache_dir=str(cache), s3_client=s3)

    target = cache / "s3" / "videogen-models" / "tiny-2b"
    assert local == str(target)
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.relative_to(target) for p in target.rglob("*") if p.name != COMPLETE_MARKER) == sorted(
        p.relative_to(model) for p in model.rglob("*")
    )
    assert not (cache / "s3" / "videogen-models" / "tiny-2b-other").exists()
    # Second resolution: served from the cache, the client is never touched.
    assert resolve_model_source("s3://videogen-models/tiny-2b", str(cache), s3_client=object()) == local


def test_s3_empty_prefix_is_an_error(tmp_path):
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="videogen-models")
        with pytest.raises(ModelSourceError, match="no objects"):
            resolve_model_source("s3://videogen-models/missing", str(tmp_path), s3_client=s3)
        with pytest.raises(ModelSourceError, match="could not download"):
            resolve_model_source("s3://no-such-bucket-here/x", str(tmp_path), s3_client=s3)
    # Nothing half-written is left behind.
    assert not any(p.is_file() for p in (tmp_path / "s3").rglob("*"))


def test_stage_loads_from_an_s3_prefix_through_the_configured_endpoint(tiny_models, s3_config, tmp_path):
    """The replica path: `load_stage` resolves s3:// with the service's own S3 settings, then from_pretrained."""
    from serve.config import AppConfig, ModelConfig
    from serve.stages.loading import load_stage
    from serve.stages.text_encoding import TextEncodingStage
    from serve.storage import Storage

    storage = Storage.from_config(s3_config)
    storage.ensure_bucket()
    root = tiny_models["2b"]
    for path in root.rglob("*"):
        if path.is_file():
            storage.put_bytes(f"weights/tiny-2b/{path.relative_to(root)}", path.read_bytes(),
                              "application/octet-stream")
    model = ModelConfig(source=f"s3://{s3_config.bucket}/weights/tiny-2b", family="cogvideox-2b", device="cpu",
                        cache_dir=str(tmp_path / "cache"))
    stage = load_stage(TextEncodingStage, AppConfig(model=model, s3=s3_config), text_encoder=True)
    emb = stage.encode("a cat", None, do_cfg=True)
    reference = TextEncodingStage.from_pretrained(str(root)).encode("a cat", None, do_cfg=True)
    assert (emb.positive == reference.positive).all() and (emb.negative == reference.negative).all()
    assert any((tmp_path / "cache").rglob(COMPLETE_MARKER))
