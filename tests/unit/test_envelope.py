"""The generation envelope and the enhancement rule (issue 13): a request inside what the model generates is
generated as asked; outside it, at the size and fps an allowed factor maps exactly onto the request, then enhanced;
anything else is a 400 that says what the model delivers. One rule for /v1/videos and the Zhipu route."""

from __future__ import annotations

import pytest

from serve.api.wire import CreateVideoRequest
from serve.api.zhipu import ZhipuCreateRequest, to_create_request
from serve.config import ApiConfig, AppConfig, ModelConfig
from serve.errors import ServiceError
from serve.jobs.params import resolve_request
from serve.stages.types import GenerationParams

API = ApiConfig()
SR2 = {"source": "org/sr-x2", "scale": 2}
SR4 = {"source": "org/sr-x4", "scale": 4}
RIFE = {"source": "org/rife"}


def model(family: str = "cogvideox-5b", enhance: dict | None = None, **defaults) -> ModelConfig:
    return ModelConfig(name="m", source="THUDM/x", family=family, defaults=defaults, enhance=enhance)


def resolve(m: ModelConfig, **fields) -> GenerationParams:
    return resolve_request(CreateVideoRequest(prompt="a cat", **fields), m, API)


def refused(m: ModelConfig, **fields) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        resolve(m, **fields)
    assert info.value.status == 400
    return info.value


def test_1440x960_at_16_fps_from_5b_is_2x_sr_and_2x_interpolation():
    m = model(enhance={"sr": SR2, "interpolation": RIFE})
    p = resolve(m, size="1440x960", fps=16)
    assert (p.width, p.height, p.num_frames, p.fps) == (720, 480, 49, 8)  # what the stages generate
    assert (p.sr_factor, p.fps_factor) == (2, 2)
    assert (p.delivered_width, p.delivered_height, p.delivered_frames, p.delivered_fps) == (1440, 960, 97, 16)
    assert p.size == "1440x960" and p.seconds == "6"  # the duration is the generated one
    assert p.sampling.enhanced and p.sampling.delivered == (97, 960, 1440, 16)
    # the cost counts the output pixels and frames on top of the denoising
    assert p.cost == p.denoise_cost + 97 * 1440 * 960


def test_inside_the_envelope_nothing_is_enhanced():
    m = model(enhance={"sr": SR2, "interpolation": RIFE})
    p = resolve(m, size="720x480")
    assert (p.sr_factor, p.fps_factor, p.sampling.enhanced) == (1, 1, False)
    assert p.cost == p.denoise_cost and p.sr_model is None
    p = resolve(m, size="1280x720")  # up to 1360 a side is generated directly
    assert (p.width, p.sr_factor) == (1280, 1)


def test_frames_and_seconds_follow_the_interpolation_factor():
    m = model(enhance={"interpolation": RIFE})
    assert resolve(m, fps=16, num_frames=97).num_frames == 49
    assert resolve(m, fps=32, num_frames=65).num_frames == 17  # 4x: 4(N-1)+1
    p = resolve(m, fps=16, seconds="2")
    assert (p.num_frames, p.delivered_frames, p.seconds) == (17, 33, "2")
    err = refused(m, fps=16, num_frames=50)
    assert err.param == "num_frames" and "2(N-1)+1" in err.message
    err = refused(m, fps=16, num_frames=113)  # 57 generated frames: over the family's 49
    assert err.param == "num_frames" and "97" in err.message


def test_an_x4_model_serves_2x_and_4x_and_speed_picks_the_lighter_weights():
    m = model(enhance={"sr": SR4, "sr_fast": SR2})
    assert resolve(m, size="2880x1920").sr_factor == 4
    p = resolve(m, size="1440x960")
    assert (p.sr_factor, p.sr_model) == (2, "sr")
    assert resolve(m, size="1440x960", quality="speed").sr_model == "sr_fast"
    # the lighter x2 weights cannot do 4x: a 4x speed request keeps the full model
    assert resolve(m, size="2880x1920", quality="speed").sr_model == "sr"


@pytest.mark.parametrize(("enhance", "fields", "param", "says"), [
    (None, {"size": "1440x960"}, "size", "no super-resolution"),  # no SR configured
    ({"sr": SR2}, {"size": "2880x1920"}, "size", "2x super-resolution"),  # a factor above what is offered
    ({"sr": SR4, "max_scale": 2}, {"size": "2880x1920"}, "size", "2x super-resolution"),  # above max_scale
    ({"sr": SR2}, {"size": "1456x960"}, "size", "1440x960"),  # 728x480: no factor maps it exactly
    ({"sr": SR2}, {"size": "1440x970"}, "size", "multiple of 16"),
    ({"interpolation": RIFE}, {"fps": 30}, "fps", "[8, 16, 32]"),  # Zhipu's 30: no factor reaches it from 8
    ({"interpolation": RIFE}, {"fps": 60}, "fps", "[8, 16, 32]"),
    ({"interpolation": RIFE, "max_fps_factor": 2}, {"fps": 32}, "fps", "[8, 16]"),
    (None, {"fps": 16}, "fps", "delivers fps [8]"),  # no interpolation configured
    ({"sr": SR2}, {"fps": 12}, "fps", "[8]"),
])
def test_every_other_combination_is_a_400_saying_what_the_model_delivers(enhance, fields, param, says):
    err = refused(model(enhance=enhance), **fields)
    assert err.param == param and says in err.message, err.message


def test_image_to_video_native_only_sizes_reach_2x_through_the_enhancer():
    m = model("cogvideox-5b-i2v", enhance={"sr": SR2, "interpolation": RIFE})
    p = resolve(m, size="1440x960", fps=16)
    assert (p.width, p.height, p.sr_factor, p.fps_factor, p.image_input) == (720, 480, 2, 2, True)
    assert refused(m, size="1280x720").param == "size"  # 640x360 is not the native size


def test_the_zhipu_route_follows_the_same_rule():
    config = AppConfig.model_validate({"model": {"name": "m", "source": "THUDM/x", "family": "cogvideox-5b",
                                                 "enhance": {"sr": SR2, "interpolation": RIFE}}})
    req = to_create_request(ZhipuCreateRequest(model="m", prompt="a cat", size="1440x960", fps=16), config)
    p = resolve_request(req, config.model, API)
    assert (p.sr_factor, p.fps_factor, p.delivered_fps) == (2, 2, 16)
    for fps in (30, 60):  # Zhipu's own frame rates: a 400 naming fps (in Zhipu's envelope on that route)
        req = to_create_request(ZhipuCreateRequest(model="m", prompt="a cat", fps=fps), config)
        with pytest.raises(ServiceError) as info:
            resolve_request(req, config.model, API)
        assert info.value.param == "fps" and "[8, 16, 32]" in info.value.message


def test_an_enhance_section_needs_weights():
    with pytest.raises(ValueError, match="sr or interpolation"):
        model(enhance={})
    with pytest.raises(ValueError, match="set sr too"):
        model(enhance={"sr_fast": SR2, "interpolation": RIFE})
