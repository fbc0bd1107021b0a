"""The image-to-video families: their presets, the sizes and frames a request may ask of them, and what
`GET /v1/models` says about them (no Ray, no torch)."""

from __future__ import annotations

from typing import get_args

import pytest

from serve.api.wire import CreateVideoRequest
from serve.config import ApiConfig, AppConfig, ModelConfig
from serve.errors import ServiceError
from serve.jobs.params import resolve_request, sizes_honoured
from serve.jobs.wiring import build_ingress
from serve.models.tiny import TINY_5B_I2V_SIZE
from serve.presets import FAMILIES, Family, preset_for
from serve.storage import Storage

API = ApiConfig()
RULE_15 = "cogvideox1.5-5b-i2v makes sizes whose short side is 768 and long side 768..1360 in multiples of 16"


def _model(family: str, **defaults) -> ModelConfig:
    return ModelConfig(name="m", source="THUDM/x", family=family, defaults=defaults)


def resolve(family: str, model: ModelConfig | None = None, **fields):
    return resolve_request(CreateVideoRequest(prompt="a cat", **fields), model or _model(family), API)


def error(family: str, model: ModelConfig | None = None, **fields) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        resolve(family, model, **fields)
    assert info.value.status == 400 and info.value.code == "invalid_value"
    return info.value


def test_the_family_literal_and_the_presets_name_the_same_families():
    assert set(get_args(Family)) == set(FAMILIES)
    assert all(preset.family == name for name, preset in FAMILIES.items())


def test_image_to_video_presets_carry_the_published_defaults():
    i2v = FAMILIES["cogvideox-5b-i2v"]
    assert (i2v.width, i2v.height, i2v.num_frames, i2v.fps, i2v.dtype) == (720, 480, 49, 8, "bfloat16")
    assert (i2v.scheduler, i2v.use_dynamic_cfg, i2v.frame_multiple, i2v.max_frames) == (
        "CogVideoXDPMScheduler", True, 8, 49)
    i15 = FAMILIES["cogvideox1.5-5b-i2v"]
    assert (i15.width, i15.height, i15.num_frames, i15.fps, i15.dtype) == (1360, 768, 81, 16, "bfloat16")
    assert (i15.scheduler, i15.use_dynamic_cfg, i15.frame_multiple, i15.max_frames) == (
        "CogVideoXDPMScheduler", True, 16, 161)
    assert {name for name, p in FAMILIES.items() if p.image_input} == {"cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"}
    # text-to-video keeps its rule: any multiple-of-16 sides within the limits
    assert {p.size_rule for p in FAMILIES.values() if not p.image_input} == {"sides"}


def test_a_model_config_takes_the_new_families():
    for family in ("cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"):
        config = AppConfig.model_validate({"model": {"name": "i2v", "source": "THUDM/x", "family": family}})
        assert config.model.preset().image_input and config.model.resolved_dtype() == "bfloat16"
    with pytest.raises(ValueError):
        ModelConfig(family="cogvideox-2b-i2v")


def test_5b_i2v_makes_only_720x480():
    p = resolve("cogvideox-5b-i2v")
    assert (p.width, p.height, p.num_frames, p.fps, p.use_dynamic_cfg) == (720, 480, 49, 8, True)
    assert resolve("cogvideox-5b-i2v", size="720x480").size == "720x480"
    for size in ("480x720", "736x480", "1280x720"):
        e = error("cogvideox-5b-i2v", size=size)
        assert e.param == "size" and "cogvideox-5b-i2v makes only its native size 720x480" in e.message
        assert f"got {size}" in e.message
    assert error("cogvideox-5b-i2v", width=720, height=496).param == "height"
    assert error("cogvideox-5b-i2v", width=704, height=480).param == "width"


@pytest.mark.parametrize("size", ["1360x768", "768x1360", "768x768", "1024x768", "768x1024", "1344x768"])
def test_1_5_i2v_makes_a_short_side_of_768_and_a_long_side_to_1360(size):
    assert resolve("cogvideox1.5-5b-i2v", size=size).size == size


@pytest.mark.parametrize("size", ["1376x768", "768x1376", "1352x768", "1280x720", "720x1280", "800x800",
                                  "768x752", "1360x1360", "0x768"])
def test_1_5_i2v_refuses_other_sizes_naming_the_rule(size):
    e = error("cogvideox1.5-5b-i2v", size=size)
    assert e.param == "size" and RULE_15 in e.message and f"got {size}" in e.message, e.message
    assert "native size is 1360x768" in e.message


def test_a_size_rule_400_names_the_field_that_breaks_it():
    assert error("cogvideox1.5-5b-i2v", width=1360, height=720).param == "height"  # short side off
    assert error("cogvideox1.5-5b-i2v", width=720, height=1360).param == "width"
    assert error("cogvideox1.5-5b-i2v", width=1376, height=768).param == "width"  # long side off
    assert error("cogvideox1.5-5b-i2v", width=768, height=1376).param == "height"


def test_no_sdk_size_fits_the_image_to_video_families_and_the_400_says_so():
    assert sizes_honoured(preset_for("cogvideox-5b-i2v")) == sizes_honoured(preset_for("cogvideox1.5-5b-i2v")) == []
    for family in ("cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"):
        assert "of the SDK's sizes it delivers none" in error(family, size="1280x720").message


def test_image_to_video_frames_follow_the_family():
    assert resolve("cogvideox-5b-i2v", num_frames=9).num_frames == 9
    for frames in (8, 17 + 4, 57):
        assert "cogvideox-5b-i2v generates 8N+1 frames, from 9 to 49" in error(
            "cogvideox-5b-i2v", num_frames=frames).message
    p = resolve("cogvideox1.5-5b-i2v")
    assert (p.width, p.height, p.num_frames, p.fps) == (1360, 768, 81, 16)
    assert resolve("cogvideox1.5-5b-i2v", num_frames=161).num_frames == 161
    assert resolve("cogvideox1.5-5b-i2v", seconds="10").num_frames == 161
    for frames in (25, 49 + 8, 177):
        e = error("cogvideox1.5-5b-i2v", num_frames=frames)
        assert e.param == "num_frames" and "16N+1 frames, from 17 to 161" in e.message


def test_the_size_rules_follow_a_tiny_deployments_overrides():
    tiny_5b = _model("cogvideox-5b-i2v", width=TINY_5B_I2V_SIZE[0], height=TINY_5B_I2V_SIZE[1], num_frames=9)
    assert resolve("cogvideox-5b-i2v", tiny_5b).size == "48x32"
    assert "makes only its native size 48x32" in error("cogvideox-5b-i2v", tiny_5b, size="64x32").message
    # the tiny 1.5-i2v's rotary grid covers sides up to 128 px
    tiny_15 = _model("cogvideox1.5-5b-i2v", width=48, height=32, num_frames=17, max_side=128)
    for size in ("48x32", "32x128", "128x32", "32x32"):
        assert resolve("cogvideox1.5-5b-i2v", tiny_15, size=size).size == size
    e = error("cogvideox1.5-5b-i2v", tiny_15, size="144x32")
    assert "short side is 32 and long side 32..128 in multiples of 16" in e.message


class NoChain:
    """`models()` runs no job: a chain that is never called."""

    async def run(self, job):  # pragma: no cover - a call is the failure
        raise AssertionError("no job runs here")


def test_models_tell_which_take_an_image(storage: Storage):
    config = AppConfig.model_validate({
        "s3": storage.cfg.model_dump(),
        "model": {"name": "t2v", "source": "THUDM/x", "family": "cogvideox-5b"},
        "models": [{"name": "i2v", "source": "THUDM/y", "family": "cogvideox1.5-5b-i2v"},
                   {"name": "i2v-5b", "source": "THUDM/z", "family": "cogvideox-5b-i2v"}]})
    graph = build_ingress(config, storage=storage, pipeline=NoChain(), owner="ingress-unit")
    t2v, i15, i5 = graph.service.models().data
    assert (t2v.id, t2v.inputs, i15.id, i15.inputs, i5.inputs) == (
        "t2v", ["text"], "i2v", ["text", "image"], ["text", "image"])
    assert i15.size_rule == RULE_15 and (i15.width, i15.height, i15.frame_rule, i15.max_frames) == (
        1360, 768, "16N+1", 161)
    assert i5.size_rule == "cogvideox-5b-i2v makes only its native size 720x480"
    assert t2v.size_rule == "cogvideox-5b makes sizes whose sides are multiples of 16 from 16 to 1360"


def test_an_image_to_video_model_is_refused_until_images_are_taken(storage: Storage):
    """Until the API takes an image, a request for an I2V model is a 400 naming the text-to-video models, and
    creates nothing (it could only fail on the stages)."""
    import asyncio

    config = AppConfig.model_validate({
        "s3": storage.cfg.model_dump(), "api": {"api_keys": ["sk-x"]},
        "model": {"name": "t2v", "source": "THUDM/x", "family": "cogvideox-5b"},
        "models": [{"name": "i2v-5b", "source": "THUDM/z", "family": "cogvideox-5b-i2v"}]})
    graph = build_ingress(config, storage=storage, pipeline=NoChain(), owner="ingress-unit")
    req = CreateVideoRequest(prompt="a cat", model="i2v-5b")
    with pytest.raises(ServiceError) as refused:
        asyncio.run(graph.service.create(req, "default"))
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "image_required",
                                                                              "input_reference")
    assert "['t2v']" in refused.value.message
    assert storage.list_keys(storage.key("jobs", "")) == []
