"""`model.parallel` (serve/config/parallel.py) and the placement group of a multi-GPU Denoiser replica
(DeploymentOptions.with_ranks, the Serve config file, the application builder): what is refused at config
validation, with what message, and the bundles Serve is given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.serve_config import check_serve_config, serve_config
from serve.config import AppConfig, DeploymentOptions, ModelConfig


def model(**fields) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "source": "THUDM/CogVideoX-5b", "family": "cogvideox-5b",
                                       **fields})


def test_a_model_is_one_rank_by_default():
    assert ModelConfig().parallel.world_size == 1 and not ModelConfig().parallel.enabled


@pytest.mark.parametrize(("family", "ulysses", "ok"), [
    ("cogvideox-2b", 2, True), ("cogvideox-2b", 3, True), ("cogvideox-2b", 4, False), ("cogvideox-2b", 8, False),
    ("cogvideox-5b", 4, True), ("cogvideox-5b", 8, True), ("cogvideox-5b", 5, False),
    ("cogvideox1.5-5b", 6, True), ("cogvideox1.5-5b-i2v", 7, False)])
def test_the_ulysses_degree_must_divide_the_real_models_heads(family, ulysses, ok):
    source = {"cogvideox-2b": "THUDM/CogVideoX-2b"}.get(family, "THUDM/CogVideoX-5b")
    if ok:
        assert model(family=family, source=source, parallel={"ulysses": ulysses}).parallel.ulysses == ulysses
        return
    with pytest.raises(ValidationError) as err:
        model(family=family, source=source, parallel={"ulysses": ulysses})
    heads = 30 if family == "cogvideox-2b" else 48
    message = str(err.value)
    assert f"ulysses={ulysses} does not divide the {heads} attention heads" in message
    assert ("[2, 3, 5, 6, 10, 15, 30]" if heads == 30 else "[2, 3, 4, 6, 8, 12, 16, 24, 48]") in message


def test_a_local_checkpoints_own_head_count_decides(tmp_path):
    from serve.models.tiny import write_tiny_model

    path = write_tiny_model("2b", tmp_path / "tiny")  # 2 heads
    assert model(source=str(path), family="cogvideox-2b", parallel={"ulysses": 2}).parallel.world_size == 2
    with pytest.raises(ValidationError, match=r"does not divide the 2 attention heads of the checkpoint at"):
        model(source=str(path), family="cogvideox-2b", parallel={"ulysses": 3})


@pytest.mark.parametrize(("parallel", "accel", "words"), [
    ({"cfg": 2}, {"cache": "faster"}, "cannot be combined with accel.cache='faster'"),
    ({"ulysses": 2}, {"compile": "regional"}, "cannot be combined with accel.compile"),
    ({"cfg": 3}, {}, "Input should be 1 or 2"),
    ({"cfg": 2, "ulysses": 24}, {}, "at most 32"),
])
def test_what_a_parallel_replica_cannot_do_is_refused(parallel, accel, words):
    with pytest.raises(ValidationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        model(parallel=parallel, accel=accel)


def test_what_it_can_do_is_accepted():
    assert model(parallel={"cfg": 2}, accel={"compile": "regional"}).parallel.world_size == 2  # outside the model
    assert model(parallel={"ulysses": 2}, accel={"cache": "first_block"}).parallel.world_size == 2
    assert model(parallel={"cfg": 2, "ulysses": 4}, accel={"cache": "pab"}).parallel.world_size == 8


def test_a_replica_of_n_ranks_reserves_n_bundles_packed_on_one_node():
    options = DeploymentOptions.model_validate(
        {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1, "resources": {"stage_denoiser": 1}}})
    ranked = options.with_ranks(2)
    assert ranked.placement_group_bundles == [{"CPU": 2, "GPU": 1, "stage_denoiser": 1}] * 2
    serve_options = ranked.to_serve_options()
    assert serve_options["placement_group_bundles"] == ranked.placement_group_bundles
    assert serve_options["placement_group_strategy"] == "STRICT_PACK"
    assert options.with_ranks(1) is options and "placement_group_bundles" not in options.to_serve_options()
    # a replica that asks for nothing still gets bundles Ray accepts
    assert DeploymentOptions().with_ranks(2).placement_group_bundles == [{"CPU": 0.01}] * 2


def test_bundles_that_do_not_fit_the_replica_or_the_ranks_are_refused():
    with pytest.raises(ValueError, match="needs 2 ranks .* placement_group_bundles has 3"):
        DeploymentOptions(placement_group_bundles=[{"CPU": 1}] * 3).with_ranks(2)
    with pytest.raises(ValidationError, match="the replica's resources must fit in it"):
        DeploymentOptions.model_validate({"ray_actor_options": {"num_gpus": 1},
                                          "placement_group_bundles": [{"CPU": 1}, {"GPU": 1}]})
    with pytest.raises(ValidationError, match="asks for nothing"):
        DeploymentOptions(placement_group_bundles=[{"CPU": 0}])
    with pytest.raises(ValidationError, match="needs placement_group_bundles"):
        DeploymentOptions(placement_group_strategy="PACK")


def _config(**denoiser) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"name": "m", "source": "THUDM/CogVideoX-5b", "family": "cogvideox-5b", "parallel": {"cfg": 2}},
        "models": [{"name": "one", "source": "THUDM/CogVideoX-5b", "family": "cogvideox-5b"}],
        "deployments": {"denoiser": {"ray_actor_options": {"num_gpus": 1}, **denoiser}}})


def _denoiser(config: dict, app: str) -> dict:
    [application] = [a for a in config["applications"] if a["name"] == app]
    return next(d for d in application["deployments"] if d["name"] == "Denoiser")


def test_the_serve_config_gives_only_the_parallel_models_denoiser_its_bundles():
    data = serve_config(_config())
    assert _denoiser(data, "model-m")["placement_group_bundles"] == [{"GPU": 1}] * 2
    assert "placement_group_bundles" not in _denoiser(data, "model-one")
    for app in data["applications"]:  # the other stages of the parallel model: one process each
        for d in app["deployments"]:
            if d["name"] not in ("Denoiser", "Model"):
                assert "placement_group_bundles" not in d, (app["name"], d["name"])
    check_serve_config(data)  # and it reads back
    _denoiser(data, "model-m")["placement_group_bundles"] = [{"GPU": 1}] * 3
    with pytest.raises(ValueError, match=r"application 'model-m', deployment 'Denoiser': .*has 3"):
        check_serve_config(data)


def test_the_builder_gives_serve_the_bundles():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from deployments.app import build_model_app

    data = serve_config(_config())
    [app] = [a for a in data["applications"] if a["name"] == "model-m"]
    built = call_user_app_builder_with_args_if_necessary(build_model_app, app["args"])
    denoiser = next(d for d in built._bound_deployment.init_args if d._bound_deployment.name == "Denoiser")
    replica = denoiser._bound_deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 0.01}] * 2  # the builder's defaults (num_cpus 0, no GPU)
    assert replica.placement_group_strategy == "STRICT_PACK"


def test_a_multi_gpu_replica_is_billed_for_every_ranks_gpu():
    from deployments.ranks import bundle_gpus

    bundles = [{"CPU": 2, "GPU": 1, "stage_denoiser": 1}, {"CPU": 2, "GPU": 1, "stage_denoiser": 1}]
    assert bundle_gpus(bundles, 2) == 2.0
    assert bundle_gpus([{"CPU": 0.01}] * 2, 2) == 0.0
