"""Request validation against the model families (no Ray, no torch, no S3)."""

import copy
from pathlib import Path

import pytest
import yaml

from deployments.serve_config import check_serve_config, load_app_config
from serve.api.wire import CreateVideoRequest
from serve.config import ApiConfig, AppConfig, ModelConfig
from serve.errors import ServiceError
from serve.jobs.params import resolve_request
from serve.presets import FAMILIES

API = ApiConfig(max_prompt_chars=50)


def model(family: str = "cogvideox-2b", **defaults) -> ModelConfig:
    return ModelConfig(name="m", aliases=["alias"], source="THUDM/x", family=family, defaults=defaults)


def resolve(family="cogvideox-2b", **fields):
    return resolve_request(CreateVideoRequest(prompt=fields.pop("prompt", "a cat"), **fields), model(family), API)


def error(family="cogvideox-2b", **fields) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        resolve(family, **fields)
    assert info.value.status == 400
    return info.value


def test_family_defaults_fill_every_field():
    p = resolve("cogvideox-2b")
    assert (p.width, p.height, p.num_frames, p.fps) == (720, 480, 49, 8)
    assert p.seconds == "6" and p.size == "720x480"
    assert p.num_inference_steps == 50 and p.guidance_scale == 6.0 and p.use_dynamic_cfg is False
    assert 0 <= p.seed < 2**32
    p5 = resolve("cogvideox-5b")
    assert p5.use_dynamic_cfg is True
    p15 = resolve("cogvideox1.5-5b")
    assert (p15.width, p15.height, p15.num_frames, p15.fps) == (1360, 768, 81, 16)


def test_seconds_map_to_allowed_frame_counts():
    assert resolve(seconds="4").num_frames == 33  # 4 s * 8 fps = 32 -> 8N+1
    assert resolve(seconds="6").num_frames == 49
    assert resolve("cogvideox1.5-5b", seconds="10").num_frames == 161
    assert resolve(seconds="5", num_frames=17).num_frames == 17  # explicit frames win


@pytest.mark.parametrize("frames", [0, 8, 10, 48, 57])
def test_frames_must_be_8n_plus_1_within_limit(frames):
    e = error(num_frames=frames)
    assert e.param == "num_frames" and "8N+1" in e.message and str(frames) in e.message


def test_cogvideox15_needs_16n_plus_1():
    assert resolve("cogvideox1.5-5b", num_frames=17).num_frames == 17
    e = error("cogvideox1.5-5b", num_frames=25)
    assert "16N+1" in e.message


def test_too_long_seconds_is_refused_naming_seconds():
    e = error(seconds="12")
    assert e.param == "seconds" and "97" in e.message


@pytest.mark.parametrize("size", ["720x481", "10x480", "720", "axb", "4096x480"])
def test_size_rules(size):
    assert error(size=size).param == "size"


@pytest.mark.parametrize("field,value", [("num_inference_steps", 0), ("num_inference_steps", 1000),
                                         ("guidance_scale", -1.0), ("guidance_scale", float("nan")),
                                         ("seed", -1), ("seed", 2**32), ("fps", 0), ("fps", 500)])
def test_numeric_ranges(field, value):
    assert error(**{field: value}).param == field


def test_prompt_rules_and_model_names():
    assert error(prompt="   ").param == "prompt"
    assert error(prompt="x" * 51).param == "prompt"
    assert error(model="sora-2").code == "model_not_found"
    assert resolve(model="alias").width == 720
    # an image is the service's business (which models take one, its bytes): params take it as given
    assert resolve(input_reference="data:image/png;base64,AAAA").width == 720


def test_overrides_change_defaults_and_limits():
    m = model(width=64, height=48, num_frames=9, max_side=128)
    p = resolve_request(CreateVideoRequest(prompt="x"), m, API)
    assert (p.width, p.height, p.num_frames) == (64, 48, 9)
    with pytest.raises(ServiceError):
        resolve_request(CreateVideoRequest(prompt="x", size="720x480"), m, API)


def test_app_config_validates_and_loads_shipped_files():
    for name in ("local", "gpu-2b", "gpu-5b", "gpu-5b-2gpu"):
        cfg = load_app_config(f"configs/{name}.yaml")
        assert cfg.model.family in FAMILIES
        opts = cfg.deployments.denoiser.to_serve_options()
        assert opts["graceful_shutdown_timeout_s"] >= 60
    local = load_app_config("configs/local.yaml")
    assert all(getattr(local.deployments, d).ray_actor_options.num_cpus == 0
               for d in ("ingress", "text_encoder", "denoiser", "vae_decoder"))
    gpu = load_app_config("configs/gpu-5b.yaml")
    assert gpu.deployments.denoiser.ray_actor_options.num_gpus == 1
    assert "autoscaling_config" in gpu.deployments.denoiser.to_serve_options()
    assert "num_replicas" not in gpu.deployments.denoiser.to_serve_options()
    with pytest.raises(ValueError, match="heartbeat_s"):
        AppConfig.model_validate({"jobs": {"lease_s": 5, "heartbeat_s": 10}})
    with pytest.raises(ValueError):
        AppConfig.model_validate({"model": {"family": "sora"}})


def test_the_cfg_parallel_5b_config_gives_its_denoiser_one_bundle_per_rank():
    """configs/gpu-5b-2gpu.yaml: CogVideoX-5b's Denoiser CFG-parallel (2 ranks), a placement group of 2 bundles packed
    on one node; a bundle count other than cfg * ulysses is refused, naming placement_group_bundles."""
    path = Path("configs/gpu-5b-2gpu.yaml")
    cfg = load_app_config(path)
    assert cfg.model.name == "cogvideox-5b" and cfg.model.parallel.cfg == 2 and cfg.model.parallel.world_size == 2
    denoiser = cfg.deployments.denoiser
    assert len(denoiser.placement_group_bundles) == 2 and denoiser.placement_group_strategy == "STRICT_PACK"
    opts = denoiser.with_ranks(cfg.model.parallel.world_size).to_serve_options()
    assert len(opts["placement_group_bundles"]) == 2 and opts["placement_group_strategy"] == "STRICT_PACK"
    assert sum(b["GPU"] for b in opts["placement_group_bundles"]) == 2
    # the catalogue's entry is the application's (one model entry), the image-to-video model stays on one GPU
    i2v = cfg.model_named("cogvideox-5b-i2v")
    assert i2v is not None and i2v.parallel.world_size == 1
    data = yaml.safe_load(path.read_text())
    assert data["applications"][0]["args"]["model"]["parallel"] == {"cfg": 2}
    # half gpu-5b.yaml's Denoiser replicas: each is two GPUs now (the same GPUs at most)
    one_gpu = load_app_config("configs/gpu-5b.yaml").deployments.denoiser.autoscaling_config.max_replicas
    assert denoiser.autoscaling_config.max_replicas * 2 == one_gpu
    broken = copy.deepcopy(data)
    [section] = [d for d in broken["applications"][0]["deployments"] if d["name"] == "Denoiser"]
    section["placement_group_bundles"].append({"CPU": 2, "GPU": 1})
    with pytest.raises(ValueError, match="placement_group_bundles") as info:
        check_serve_config(broken)
    assert "3" in str(info.value) and "2 ranks" in str(info.value)


def test_width_and_height_are_an_alternative_to_size():
    p = resolve(width=64, height=48)
    assert (p.width, p.height, p.size) == (64, 48, "64x48")
    assert resolve(size="64x48", width=64, height=48).size == "64x48"  # both, agreeing
    assert error(width=64).param == "height" and error(height=48).param == "width"
    assert error(size="64x48", width=96, height=48).param == "size"  # both, disagreeing
    bad = error(width=65, height=48)
    assert bad.param == "width" and "multiple of 16" in bad.message
    assert error(width=64, height=4096).param == "height"


@pytest.mark.parametrize("seconds", ["4", "8", "12"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_sdks_seconds_are_made_where_the_model_can_and_named_where_not(family, seconds):
    """`openai`'s VideoSeconds: accepted wherever the family's frame limit holds them, else a 400 that names
    what this model makes (its longest clip and which of the SDK's values fit)."""
    preset = FAMILIES[family]
    frames = preset.frames_for_seconds(float(seconds), preset.fps)
    if frames <= preset.max_frames:
        p = resolve(family, seconds=seconds)
        assert p.num_frames == frames and float(p.seconds) >= float(seconds)
        return
    err = error(family, seconds=seconds)
    assert err.param == "seconds"
    longest = f"{(preset.max_frames - 1) / preset.fps:g}"
    fitting = [s for s in ("4", "8", "12")
               if preset.frames_for_seconds(float(s), preset.fps) <= preset.max_frames]
    assert f"at most {longest} seconds" in err.message and str(fitting) in err.message, err.message


SR_X2 = {"sr": {"source": "org/sr-x2", "scale": 2}}


@pytest.mark.parametrize("size", ["720x1280", "1280x720", "1024x1792", "1792x1024"])
# the image-to-video families make none of them (tests/unit/test_i2v_presets.py)
@pytest.mark.parametrize("family", sorted(f for f, p in FAMILIES.items() if not p.image_input))
def test_the_sdks_sizes_are_delivered_by_every_family_with_2x_super_resolution(family, size):
    """2b and 5b generate up to 1360 a side: the 1792 sizes come from 512x896 through 2x super-resolution."""
    frames = 9 if FAMILIES[family].frame_multiple == 8 else 17
    m = ModelConfig(name="m", source="THUDM/x", family=family, enhance=SR_X2)
    p = resolve_request(CreateVideoRequest(prompt="a cat", size=size, num_frames=frames), m, API)
    assert p.size == size and (p.delivered_width, p.delivered_height) == tuple(int(v) for v in size.split("x"))
    direct = FAMILIES[family].size_allowed(p.delivered_width, p.delivered_height)
    assert p.sr_factor == (1 if direct else 2) and (p.width * p.sr_factor, p.height * p.sr_factor) == (
        p.delivered_width, p.delivered_height)
    if not direct:  # without super-resolution the same request is a 400 that says what it delivers
        err = error(family, size=size, num_frames=frames)
        assert "no super-resolution" in err.message and "'1280x720'" in err.message


def test_a_size_the_model_cannot_make_names_the_sdks_sizes_it_can():
    err = error("cogvideox-2b", size="4096x720")
    assert err.param == "size" and "native size is 720x480" in err.message
    assert "'1280x720'" in err.message and "'1792x1024'" not in err.message


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_makes_its_own_defaults(family):
    """A preset whose default size or frames broke its own rules would refuse every request that sends none."""
    preset = FAMILIES[family]
    p = resolve(family)
    assert (p.width, p.height, p.num_frames, p.fps) == (preset.width, preset.height, preset.num_frames, preset.fps)
    assert preset.size_allowed(preset.width, preset.height) and preset.frames_allowed(preset.num_frames)
