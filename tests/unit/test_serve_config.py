"""The configuration the way Ray Serve means it: every autoscaling field Ray has, and `serve build` output
that `serve deploy`'s schema accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.config import AutoscalingConfig, DeploymentOptions

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
    proc = subprocess.run([Path(sys.executable).with_name("serve"), "build", "deployments.app:app", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    built = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(built)  # what `serve deploy` validates the file with
    [app] = schema.applications
    assert app.import_path == "deployments.app:app"
    names = {d["name"] for d in built["applications"][0]["deployments"]}
    assert names == {"Ingress", "TextEncoder", "Denoiser", "VaeDecoder"}
