"""The configuration the way Ray Serve means it: every autoscaling field Ray has, and `serve build` output
that `serve deploy`'s schema accepts."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.serve_config import check_serve_config, normalised, serve_config
from serve.config import (
    AppConfig,
    AutoscalingConfig,
    DeploymentOptions,
    DeploymentsConfig,
    IngressArgs,
    IngressSettings,
    ModelAppArgs,
)

ROOT = Path(__file__).resolve().parents[2]


def test_autoscaling_config_has_every_field_of_rays():
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    assert set(AutoscalingConfig.model_fields) == set(RayAutoscalingConfig.model_fields)


def test_every_autoscaling_field_reaches_ray_and_validates_there():
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ours = AutoscalingConfig(
        min_replicas=0, max_replicas=4, initial_replicas=1, target_ongoing_requests=1.5, upscale_delay_s=5,
        downscale_delay_s=120, downscale_to_zero_delay_s=900, look_back_period_s=20, metrics_interval_s=5,
        smoothing_factor=1.0, upscale_smoothing_factor=2.0, downscale_smoothing_factor=0.5, upscaling_factor=1.5,
        downscaling_factor=0.5, aggregation_function="max",
        policy={"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"})
    options = DeploymentOptions(autoscaling_config=ours).to_serve_options()["autoscaling_config"]
    assert set(options) == set(AutoscalingConfig.model_fields)  # nothing dropped on the way
    theirs = RayAutoscalingConfig(**options)
    assert theirs.downscale_to_zero_delay_s == 900 and theirs.look_back_period_s == 20
    assert theirs.aggregation_function == "max" and theirs.upscale_smoothing_factor == 2.0
    # unset fields are left to Ray's defaults, not forced to ours
    assert set(DeploymentOptions(autoscaling_config=AutoscalingConfig()).to_serve_options()["autoscaling_config"]) == {
        "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_replicas": 3, "max_replicas": 2}, "must be >= min_replicas"),
    ({"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}, "initial_replicas"),
    ({"aggregation_function": "median"}, "aggregation_function"),
    ({"policy": {"policy_function": "not a path"}}, "policy_function"),
    ({"look_back_perod_s": 10}, "Extra inputs are not permitted"),
])
def test_autoscaling_config_says_what_is_wrong(fields, message):
    with pytest.raises(ValidationError, match=message):
        AutoscalingConfig(**fields)


def test_serve_build_writes_a_config_serve_deploy_accepts(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    proc = subprocess.run([Path(sys.executable).with_name("serve"), "build", "deployments.app:model_app",
                           "deployments.app:app", "-o", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    built = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(built)  # what `serve deploy` validates the file with
    model_app, ingress_app = built["applications"]
    assert model_app["import_path"] == "deployments.app:model_app" and ingress_app["import_path"] == "deployments.app:app"
    assert {d["name"] for d in model_app["deployments"]} == {"Model", "TextEncoder", "Denoiser", "VaeDecoder"}
    assert {d["name"] for d in ingress_app["deployments"]} == {"Ingress"}
    # the renames `serve build` asks for (README), then the file is one this service runs
    model_app.update(name="model-cogvideox-tiny-2b", route_prefix=None, import_path="deployments.app:build_model_app",
                     args=ModelAppArgs().model_dump(mode="json"))
    ingress_app.update(name="videogen", route_prefix="/", import_path="deployments.app:build_app",
                       args=IngressArgs().model_dump(mode="json"))
    ServeDeploySchema.model_validate(built)
    config = check_serve_config(built)
    assert config.settings() == IngressSettings()  # the Ingress's user_config shows every run-time setting
    assert config.deployments == DeploymentsConfig()


# ---- the Serve config file: one application per model, args only what is loaded -------------------------------

def two_models(**changes) -> AppConfig:
    data = {"model": {"name": "tiny-2b", "family": "cogvideox-2b", "device": "cpu"},
            "models": [{"name": "tiny-5b", "family": "cogvideox-5b", "device": "cpu"}],
            "deployments": {"denoiser": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}}}
    data.update(changes)
    return AppConfig.model_validate(data)


def code_versions(data: dict) -> dict[str, str]:
    """Ray Serve's own code version of each application: a change restarts every replica of that application."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    return {app.name: get_app_code_version(app) for app in ServeDeploySchema.model_validate(data).applications}


def test_each_model_is_an_application_whose_args_are_only_what_it_loads():
    data = serve_config(two_models())
    apps = {a["name"]: a for a in data["applications"]}
    assert list(apps) == ["model-tiny-2b", "model-tiny-5b", "videogen"]
    for name in ("model-tiny-2b", "model-tiny-5b"):
        assert set(apps[name]["args"]) == {"model", "s3"}
        assert apps[name]["route_prefix"] is None
        assert [d["name"] for d in apps[name]["deployments"]] == ["TextEncoder", "Denoiser", "VaeDecoder"]
    assert set(apps["videogen"]["args"]) == {"s3"}
    [ingress] = apps["videogen"]["deployments"]
    assert IngressSettings.model_validate(ingress["user_config"]) == two_models().settings()
    assert check_serve_config(data) == two_models()  # and it reads back as the same config


@pytest.mark.parametrize("change", [
    {"deployments": {"denoiser": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 9,
                                                          "look_back_period_s": 60}}}},
    {"deployments": {"denoiser": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
                     "text_encoder": {"num_replicas": 3, "max_ongoing_requests": 4}}},
    {"safety": {"blocked_terms": {"violence": ["gore"]}}},
    {"plans": {"plans": {"standard": {"requests_per_minute": 7}}}},
    {"jobs": {"lease_s": 90, "heartbeat_s": 9}},
    {"webhooks": {"max_attempts": 2}},
])
def test_run_time_changes_leave_every_applications_code_version_alone(change):
    before, after = code_versions(serve_config(two_models())), code_versions(serve_config(two_models(**change)))
    assert before == after


def test_switching_between_fixed_replicas_and_autoscaling_restarts_the_application():
    # Ray 2.60 hashes the list of the deployments' autoscaling policies: one more autoscaled deployment is a new
    # code version even without a policy (README says so: pick fixed or autoscaled once, then tune the bounds)
    fixed = code_versions(serve_config(two_models(deployments={})))
    scaled = code_versions(serve_config(two_models()))
    assert fixed["model-tiny-2b"] != scaled["model-tiny-2b"]
    assert fixed["videogen"] == scaled["videogen"]


def test_adding_or_changing_a_model_changes_that_models_application_only():
    before = code_versions(serve_config(two_models()))
    added = code_versions(serve_config(two_models(models=[
        {"name": "tiny-5b", "family": "cogvideox-5b", "device": "cpu"},
        {"name": "tiny-5b-fast", "family": "cogvideox-5b", "device": "cpu", "accel": {"cache": "first_block"}}])))
    assert {k: added[k] for k in before} == before and "model-tiny-5b-fast" in added
    changed = code_versions(serve_config(two_models(models=[
        {"name": "tiny-5b", "family": "cogvideox-5b", "device": "cpu", "dtype": "bfloat16"}])))
    assert changed["model-tiny-5b"] != before["model-tiny-5b"]
    assert {k: v for k, v in changed.items() if k != "model-tiny-5b"} == {
        k: v for k, v in before.items() if k != "model-tiny-5b"}


def _edit(data: dict, fn) -> dict:
    data = copy.deepcopy(data)
    fn(data)
    return data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["applications"].pop(1), "model 'tiny-5b' has no application 'model-tiny-5b'"),
    (lambda d: d["applications"][1]["args"]["model"].update(dtype="float16"), "differs from the Ingress catalogue"),
    (lambda d: d["applications"][1]["args"]["s3"].update(bucket="other"), "one bucket serves all"),
    (lambda d: d["applications"][2]["deployments"][0]["user_config"]["models"].clear(), "not a model of the"),
    (lambda d: d["applications"][0]["deployments"][1].update(name="Denoizer"), "has no deployment ['Denoizer']"),
    (lambda d: d["applications"].pop(), "no application named 'videogen'"),
    (lambda d: d["applications"][2]["deployments"][0]["user_config"].update(safety={"blocked": 1}), "safety"),
])
def test_a_serve_config_that_cannot_work_is_refused_with_what_to_fix(edit, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_serve_config(_edit(serve_config(two_models()), edit))


def test_normalised_files_spell_out_what_was_checked(tmp_path, monkeypatch):
    data = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # a replica elsewhere must not resolve ./models against its own directory
    out = normalised(data)
    [model_app, i2v_app, ingress_app] = out["applications"]
    assert model_app["args"]["model"]["source"] == str(tmp_path / "models" / "tiny-2b")
    assert ingress_app["deployments"][0]["user_config"]["model"] == model_app["args"]["model"]
    # the quick start serves a tiny image-to-video model beside the text-to-video one
    assert i2v_app["args"]["model"]["family"] == "cogvideox-5b-i2v"
    assert ingress_app["deployments"][0]["user_config"]["models"] == [i2v_app["args"]["model"]]
    assert ingress_app["deployments"][0]["user_config"]["api"]["api_keys"] == ["sk-local-dev"]  # not masked
    assert data["applications"][0]["args"]["model"]["source"] == "./models/tiny-2b"  # the input is left alone


def test_a_section_overrides_the_codes_defaults_field_by_field():
    data = serve_config(two_models())
    [ingress] = data["applications"][2]["deployments"]
    data["applications"][2]["deployments"] = [{"name": "Ingress", "user_config": ingress["user_config"]}]
    data["applications"][0]["deployments"][0] = {"name": "TextEncoder", "num_replicas": 3}
    config = check_serve_config(data)
    assert config.deployments.ingress == DeploymentsConfig().ingress  # what build_app gives the Ingress
    assert config.deployments.text_encoder == DeploymentOptions(num_replicas=3)


# ---- logs: JSON everywhere, so a line's job_id and tenant stay fields ------------------------------------------

def _rayservice_serve_config() -> dict:
    rayservice = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


SHIPPED = {
    "configs/local.yaml": lambda: yaml.safe_load((ROOT / "configs" / "local.yaml").read_text()),
    "configs/gpu-2b.yaml": lambda: yaml.safe_load((ROOT / "configs" / "gpu-2b.yaml").read_text()),
    "configs/gpu-5b.yaml": lambda: yaml.safe_load((ROOT / "configs" / "gpu-5b.yaml").read_text()),
    "configs/gpu-5b-2gpu.yaml": lambda: yaml.safe_load((ROOT / "configs" / "gpu-5b-2gpu.yaml").read_text()),
    "k8s/base/rayservice.yaml serveConfigV2": _rayservice_serve_config,
    "deployments.serve_config.serve_config": lambda: serve_config(two_models()),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_serve_config_logs_json_for_every_application(name):
    from ray.serve.schema import EncodingType, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(SHIPPED[name]())
    assert schema.logging_config is not None, f"{name}: no logging_config for Serve's proxies and controller"
    configs = {"(proxies, controller)": schema.logging_config}
    # each application's own: what its replicas get wherever the file is deployed (python -m deployments.local
    # deploys the applications only, without the file's top-level fields)
    configs |= {app.name: app.logging_config for app in schema.applications}
    assert len(configs) == len(schema.applications) + 1 >= 3
    for where, logging_config in configs.items():
        assert logging_config is not None, f"{name}: application {where} sets no logging_config"
        assert (logging_config.encoding, logging_config.log_level) == (EncodingType.JSON, "INFO"), (name, where)
        assert logging_config.enable_access_log, (name, where)


def test_logging_config_is_no_part_of_an_applications_code_version():
    # so turning JSON on (or back off) reconfigures running replicas instead of restarting them
    data = serve_config(two_models())
    text = copy.deepcopy(data)
    for app in text["applications"]:
        app["logging_config"] = {"encoding": "TEXT", "log_level": "DEBUG"}
    assert code_versions(text) == code_versions(data)


def _dev_overlay_serve_config() -> dict:
    patch = yaml.safe_load((ROOT / "k8s" / "overlays" / "dev" / "rayservice-patch.yaml").read_text())
    (op,) = [p for p in patch if p.get("path") == "/spec/serveConfigV2"]
    return yaml.safe_load(op["value"])


@pytest.mark.parametrize("name", [n for n in SHIPPED if not n.startswith("deployments.")] + ["k8s dev overlay"])
def test_every_shipped_config_serves_zhipus_model_names(name):
    """A Zhipu client's `model` (cogvideox, cogvideox-flash, ...) reaches the served model unchanged."""
    from serve.api.zhipu import ZHIPU_MODELS

    data = _dev_overlay_serve_config() if name == "k8s dev overlay" else SHIPPED[name]()
    config = check_serve_config(data)
    for zhipu_name in ZHIPU_MODELS:
        assert config.model_named(zhipu_name) is not None, (name, zhipu_name)


def test_serve_calls_both_builders_with_the_args_of_a_config_file():
    """`serve deploy` calls an application builder with exactly one argument (the file's `args`); Serve refuses a
    builder with more parameters. The injection points (`model_application`'s classes) live beside them."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_app, build_model_app

    config = serve_config(AppConfig())
    for app in config["applications"]:
        builder = {"deployments.app:build_model_app": build_model_app,
                   "deployments.app:build_app": build_app}[app["import_path"]]
        built = call_user_app_builder_with_args_if_necessary(builder, app["args"])
        assert isinstance(built, Application)
