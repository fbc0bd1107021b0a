"""The Kubernetes manifests: each overlay renders with kubectl, every object validates, and the cluster they describe
can run the Serve application they carry (placement, GPUs, replicas, secrets, identity, monitoring)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.config import AppConfig, DeploymentOptions, DeploymentsConfig
from serve.config.parallel import ParallelConfig
from serve.stages.stage import ENHANCER, stages_for
from serve.stages.stage import STAGES as MODEL_STAGES
from tests.k8s.kube import (
    CRD_FILES,
    K8S,
    MONITORING_SCHEMAS,
    PROD_OVERLAYS,
    ROOT,
    SCHEMAS,
    crd_errors,
    is_core,
    monitoring_errors,
    render,
    render_warnings,
    rendered_text,
    require_kubectl,
    validate_core,
    validate_metadata,
    validate_pod_template,
)

IMPORT_PATHS = ("deployments.app:build_model_app", "deployments.app:build_app")
STAGES = ("ingress", "text_encoder", "denoiser", "vae_decoder", "enhancer")
GPU = "nvidia.com/gpu"
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
DASHBOARDS = K8S / "monitoring" / "dashboards"
RULES = K8S / "monitoring" / "alerts.rules.yaml"
# the image-to-video model each overlay serves beside its text-to-video default: (name, family, weights' repo)
I2V_MODELS = {"dev": ("cogvideox-5b-i2v", "cogvideox-5b-i2v", "CogVideoX-5b-I2V"),
              **{prod: ("cogvideox1.5-5b-i2v", "cogvideox1.5-5b-i2v", "CogVideoX1.5-5B-I2V") for prod in PROD_OVERLAYS}}
# the Serve config file each prod overlay's serveConfigV2 is (with the k8s changes and prod's image-to-video model)
PROD_CONFIGS = {"prod": "gpu-5b", "prod-2gpu": "gpu-5b-2gpu"}
# what kustomize v5 deprecates (`kustomize edit fix` rewrites them) and what replaced each
KUSTOMIZE_DEPRECATED = {"bases": "resources", "patchesStrategicMerge": "patches", "patchesJson6902": "patches",
                        "commonLabels": "labels", "vars": "replacements", "imageTags": "images"}
KUSTOMIZE_V5_FIELDS = {"apiVersion", "kind", "metadata", "resources", "components", "namespace", "namePrefix",
                       "nameSuffix", "labels", "commonAnnotations", "configMapGenerator", "secretGenerator",
                       "generatorOptions", "patches", "images", "replacements", "replicas", "crds", "openapi",
                       "buildMetadata", "sortOptions"}


# ---- fixtures and helpers --------------------------------------------------------------------------------------------

def _all(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = _all(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _cluster(rs: dict[str, Any]) -> dict[str, Any]:
    return rs["spec"]["rayClusterConfig"]


def _groups(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _cluster(rs)["workerGroupSpecs"]}


def _templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"head": _cluster(rs)["headGroupSpec"]["template"],
            **{name: g["template"] for name, g in _groups(rs).items()}}


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def _ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """rayStartParams `resources: '"{\\"name\\": n}"'` (KubeRay passes it quoted to `ray start --resources`)."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    return json.loads(raw.strip().strip('"').replace('\\"', '"'))


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_gpus(group: dict[str, Any]) -> float:
    limits = _ray_container(group["template"]).get("resources", {}).get("limits", {})
    return _quantity(limits.get(GPU, 0))


def _pod_cpus(group: dict[str, Any]) -> float:
    """What Ray advertises: rayStartParams num-cpus, else the container's CPU limit (KubeRay's default)."""
    params = group.get("rayStartParams", {})
    if "num-cpus" in params:
        return float(params["num-cpus"])
    return _quantity(_ray_container(group["template"])["resources"]["limits"]["cpu"])


def _replica_range(opts: DeploymentOptions) -> tuple[int, int]:
    if opts.autoscaling_config is not None:
        return opts.autoscaling_config.min_replicas, opts.autoscaling_config.max_replicas
    assert opts.num_replicas is not None
    return opts.num_replicas, opts.num_replicas


def _stage_options(serve_config: dict[str, Any], app: AppConfig) -> list[tuple[str, str, DeploymentOptions]]:
    """(application, stage, options) of the Ingress and of every model application's stages (each model its own
    replicas: they share the worker groups' slots; the Enhancer only for a model with `enhance`), the section's
    fields over the code's defaults as Serve applies them (deployments/serve_config.py `_options`); a parallel model's
    Denoiser with its placement group of one bundle per rank (`stage_options`: DeploymentOptions.with_ranks)."""
    out: list[tuple[str, str, DeploymentOptions]] = [("videogen", "ingress", app.deployments.ingress)]
    defaults = DeploymentsConfig()
    for application in serve_config["applications"]:
        if application["import_path"] != IMPORT_PATHS[0]:
            continue
        sections = {d["name"]: d for d in application.get("deployments") or []}
        for stage in stages_for(application["args"]["model"].get("enhance") is not None):
            fields = {k: v for k, v in sections.get(stage.deployment, {}).items() if k not in ("name", "user_config")}
            default = getattr(defaults, stage.key)
            opts = DeploymentOptions.model_validate({**default.model_dump(exclude_none=True), **fields})
            if stage.key == "denoiser":
                parallel = ParallelConfig.model_validate(application["args"]["model"].get("parallel") or {})
                opts = opts.with_ranks(parallel.world_size)
            out.append((application["name"], stage.key, opts))
    return out


# Ray's own resources: never a worker group's custom resource (num_cpus / num_gpus / memory of an actor)
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _replica_needs(opts: DeploymentOptions) -> tuple[float, float, dict[str, float]]:
    """(GPUs, CPUs, custom resources) one replica takes of a pod: its ray_actor_options, or, with
    placement_group_bundles (a Denoiser of several ranks), the SUM of its bundles: the replica runs inside bundle 0
    (its ray_actor_options come out of it) and its worker ranks in the others, and STRICT_PACK puts them all on one
    node, so one pod must hold the whole placement group."""
    bundles = opts.placement_group_bundles
    if bundles is None:
        actor = opts.ray_actor_options
        return actor.num_gpus, actor.num_cpus, dict(actor.resources or {})
    assert (opts.placement_group_strategy or "STRICT_PACK") == "STRICT_PACK", \
        f"placement_group_strategy {opts.placement_group_strategy}: a replica's ranks must share one pod (STRICT_PACK)"
    custom: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            if k not in _RAY_RESOURCES:
                custom[k] = custom.get(k, 0) + v
    return (sum(b.get("GPU", 0) for b in bundles), sum(b.get("CPU", 0) for b in bundles), custom)


def _placement(rs: dict[str, Any], app: AppConfig, serve_config: dict[str, Any]
               ) -> dict[str, list[tuple[str, int, DeploymentOptions]]]:
    """group -> [(stage, replicas one pod holds, options)] over every application; asserts each stage lands on
    exactly one group. A replica takes `_replica_needs` of a pod: with placement_group_bundles, all its bundles."""
    groups = _groups(rs)
    hosted: dict[str, list[tuple[str, int, DeploymentOptions]]] = {name: [] for name in groups}
    for app_name, stage, opts in _stage_options(serve_config, app):
        assert stage in STAGES, stage
        actor = opts.ray_actor_options
        assert actor.resources, \
            f"{app_name} {stage}: ray_actor_options.resources must name its worker group's custom resource"
        gpus, cpus, wanted = _replica_needs(opts)
        if opts.placement_group_bundles is not None:
            for i, bundle in enumerate(opts.placement_group_bundles):
                assert {k for k in bundle if k not in _RAY_RESOURCES} == set(actor.resources), \
                    f"{app_name} {stage}: bundle {i} ({bundle}) must ask for the group's resource {actor.resources}"
        hosts = [n for n, g in groups.items() if all(_ray_resources(g).get(k, 0) >= v for k, v in wanted.items())]
        assert len(hosts) == 1, \
            f"{app_name} {stage} asks for {wanted}: exactly one worker group must advertise it, got {hosts}"
        group = groups[hosts[0]]
        slots = min(math.floor(_ray_resources(group)[k] / v + 1e-9) for k, v in wanted.items())
        if gpus:
            slots = min(slots, math.floor(_pod_gpus(group) / gpus + 1e-9))
        if cpus:
            slots = min(slots, math.floor(_pod_cpus(group) / cpus + 1e-9))
        assert slots >= 1, f"{app_name} {stage} (GPUs {gpus}, CPUs {cpus}, {wanted}) does not fit one pod of group " \
                           f"{hosts[0]}"
        hosted[hosts[0]].append((stage, slots, opts))
    return hosted


# ---- rendering and schemas -------------------------------------------------------------------------------------------

def test_kubectl_is_installed() -> None:
    require_kubectl()


def test_overlay_renders_the_expected_objects(objects: tuple[dict[str, Any], ...], overlay: str) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "RayService", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor",
            "PrometheusRule", "Deployment", "Service", "ConfigMap"} <= kinds  # the last three: the front proxy
    namespace = _one(objects, "Namespace")["metadata"]["name"]
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == namespace, f"{o['kind']}/{o['metadata']['name']}"


def test_every_object_validates_against_its_schema(objects: tuple[dict[str, Any], ...]) -> None:
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if is_core(obj):
            validate_core(obj)
        elif obj["kind"] in CRD_FILES:
            assert crd_errors(obj) == [], where
            validate_metadata(obj)
        elif obj["kind"] in MONITORING_SCHEMAS:
            assert monitoring_errors(obj) == [], where
            validate_metadata(obj)
        else:
            pytest.fail(f"{where} ({obj['apiVersion']}): no schema to validate it against")


def test_rayservice_cluster_validates_as_a_raycluster(rayservice: dict[str, Any]) -> None:
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "videogen"},
               "spec": _cluster(rayservice)}
    assert crd_errors(cluster) == []


def test_pod_templates_validate_as_core_pod_templates(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    for template in _templates(rayservice).values():
        validate_pod_template(template)


@pytest.mark.parametrize("mutate, expected", [
    (lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "is not of type 'string'"),
    (lambda rs: rs["spec"]["rayClusterConfig"].update(gcsFaultToleranceOptions={"redisAdress": "r:6379"}),
     "redisAdress"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["autoscalerOptions"].update(version="v3"), "v3"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
     .append({"containerPort": 8080, "name": "again"}), "duplicate"),
])
def test_crd_validation_rejects_broken_rayservices(mutate: Any, expected: str) -> None:
    require_kubectl()
    broken = copy.deepcopy(_one(render(K8S / "overlays" / "prod"), "RayService"))
    mutate(broken)
    errors = crd_errors(broken)
    assert any(expected in e for e in errors), errors


def _kustomizations() -> list[Path]:
    files = sorted(K8S.rglob("kustomization.yaml"))
    assert {p.parent.relative_to(K8S).as_posix() for p in files} >= {"base", "overlays/dev", "overlays/prod"}
    return files


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: p.parent.relative_to(K8S).as_posix())
def test_kustomizations_use_kustomize_v5_fields(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    deprecated = {f"{k} (use {KUSTOMIZE_DEPRECATED[k]})" for k in set(data) & set(KUSTOMIZE_DEPRECATED)}
    assert not deprecated, f"{path.relative_to(ROOT)}: deprecated in kustomize v5: {sorted(deprecated)}"
    assert set(data) <= KUSTOMIZE_V5_FIELDS, f"{path.relative_to(ROOT)}: {set(data) - KUSTOMIZE_V5_FIELDS}"
    assert (data.get("apiVersion"), data.get("kind")) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    for entry in data.get("resources", []):
        target = path.parent / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: resource {entry}"
    for patch in data.get("patches", []):
        assert "path" in patch and (path.parent / patch["path"]).is_file(), f"{path}: patch {patch}"
    # commonLabels also wrote its labels into selectors; `labels` must say whether it does
    for entry in data.get("labels", []):
        assert entry.get("includeSelectors") is False, \
            f"{path}: labels {entry.get('pairs')} must keep includeSelectors: false (KubeRay's pods do not carry them)"


def test_overlays_render_without_kustomize_warnings(overlay: str) -> None:
    require_kubectl()
    assert render_warnings(K8S / "overlays" / overlay) == []


def test_kuberay_crd_copies_are_verbatim() -> None:
    source = (SCHEMAS / "SOURCE.txt").read_text()
    for name in CRD_FILES.values():
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in source, f"{name} differs from the copy SOURCE.txt describes"


# ---- the Serve application -------------------------------------------------------------------------------------------

def test_serve_config_is_the_apps_config(serve_config: dict[str, Any], app_config: AppConfig) -> None:
    apps = serve_config["applications"]
    # one application per model, then the ingress application
    assert [a["import_path"] for a in apps] == [IMPORT_PATHS[0]] * len(app_config.all_models()) + [IMPORT_PATHS[1]]
    assert app_config.model.device == "cuda"
    assert app_config.api.api_keys == [] and app_config.keys.keys_file, "production auth is the keys file only"


def test_serve_accepts_the_serve_config(serve_config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)  # what KubeRay's `serve deploy` validates it with
    assert [a.name for a in schema.applications][-1] == "videogen"
    assert all(a.route_prefix is None for a in schema.applications[:-1]), "model applications take no HTTP"


@pytest.mark.parametrize("import_path", IMPORT_PATHS)
def test_import_path_imports_without_a_gpu(import_path: str) -> None:
    module, _, attr = import_path.partition(":")
    code = f"import importlib; assert callable(getattr(importlib.import_module({module!r}), {attr!r}))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def _without_k8s_changes(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)  # (yaml anchors: the model entry is one object in both places)
    for app in config["applications"]:
        app["args"].get("model", {}).pop("source", None)
        for opts in app["deployments"]:
            opts.get("ray_actor_options", {}).pop("resources", None)
            # a parallel Denoiser's bundles ask for the group's custom resource too (k8s only, like the above)
            for bundle in opts.get("placement_group_bundles") or []:
                for key in [k for k in bundle if k not in _RAY_RESOURCES]:
                    del bundle[key]
    return config


def _as_prods_i2v(config: dict[str, Any]) -> dict[str, Any]:
    """configs/gpu-5b.yaml with prod's image-to-video model: CogVideoX1.5-5B-I2V where the file has CogVideoX-5b-I2V
    (the same stage options)."""
    config = copy.deepcopy(config)
    name, family, _ = I2V_MODELS["prod"]
    for app in config["applications"]:
        if app["name"] == "model-cogvideox-5b-i2v":
            app["name"] = f"model-{name}"
            app["args"]["model"].update(name=name, family=family)  # (the catalogue's entry is the same object)
    return config


def _check_prod_serve_config(overlay: str) -> dict[str, Any]:
    """A prod overlay's serveConfigV2 is its configs/ file (PROD_CONFIGS) but for the k8s changes and prod's
    image-to-video model; the serveConfigV2, parsed."""
    require_kubectl()
    serve_config = yaml.safe_load(_one(render(K8S / "overlays" / overlay), "RayService")["spec"]["serveConfigV2"])
    path = ROOT / "configs" / f"{PROD_CONFIGS[overlay]}.yaml"
    expected = yaml.safe_load(path.read_text())
    assert _without_k8s_changes(serve_config) == _without_k8s_changes(_as_prods_i2v(expected)), \
        f"{overlay}'s serveConfigV2 and {path.relative_to(ROOT)} differ (beyond model.source, resources and the " \
        "image-to-video model)"
    for app in serve_config["applications"][:-1]:
        assert app["args"]["model"]["source"].startswith("s3://"), app["name"]
    assert serve_config["applications"][0]["name"] == "model-cogvideox-5b"
    assert {m["name"]: m["source"] for m in (a["args"]["model"] for a in expected["applications"][:-1])} == {
        "cogvideox-5b": "THUDM/CogVideoX-5b", "cogvideox-5b-i2v": "THUDM/CogVideoX-5b-I2V"}
    return serve_config


def test_prod_serve_config_is_configs_gpu_5b() -> None:
    # dev is CogVideoX-2b + 5b-I2V on fewer GPUs: its own config, held to the same structural tests
    _check_prod_serve_config("prod")


def test_prod_2gpu_serve_config_is_configs_gpu_5b_2gpu() -> None:
    """prod-2gpu: configs/gpu-5b-2gpu.yaml (CogVideoX-5b's Denoiser CFG-parallel, 2 ranks), and its denoiser group's
    pod is exactly one such replica: 2 GPUs = the two bundles' GPUs, the custom resource = theirs, CPUs enough."""
    from deployments.serve_config import check_serve_config

    serve_config = _check_prod_serve_config("prod-2gpu")
    app = check_serve_config(serve_config)
    rs = _one(render(K8S / "overlays" / "prod-2gpu"), "RayService")
    [(_, _, opts)] = [o for o in _stage_options(serve_config, app) if o[:2] == ("model-cogvideox-5b", "denoiser")]
    assert app.model.name == "cogvideox-5b" and app.model.parallel.world_size == 2 and app.model.parallel.cfg == 2
    assert opts.placement_group_strategy == "STRICT_PACK" and len(opts.placement_group_bundles or []) == 2
    gpus, cpus, custom = _replica_needs(opts)
    assert (gpus, cpus, custom) == (2, 4, {"stage_denoiser": 2})
    group = _groups(rs)["denoiser"]
    assert _pod_gpus(group) == gpus == 2, "a denoiser pod holds exactly one 2-rank replica's bundles"
    assert group["rayStartParams"].get("num-gpus") == "2"
    assert _ray_resources(group) == custom
    assert cpus <= _pod_cpus(group)
    placement = _placement(rs, app, serve_config)
    assert [(stage, slots) for stage, slots, _ in placement["denoiser"]] == [("denoiser", 1)], \
        "the denoiser group hosts CogVideoX-5b's 2-GPU Denoiser alone, one replica per pod"
    assert (group["minReplicas"], group["maxReplicas"]) == _replica_range(opts) == (1, 4)
    # the image-to-video model's one-GPU Denoiser: a group of its own, one replica per 1-GPU pod
    [(i2v_stage, i2v_slots, i2v)] = placement["denoiser-i2v"]
    assert (i2v_stage, i2v_slots, i2v.placement_group_bundles) == ("denoiser", 1, None)
    assert _pod_gpus(_groups(rs)["denoiser-i2v"]) == i2v.ray_actor_options.num_gpus == 1


def test_overlay_serves_its_image_to_video_model(serve_config: dict[str, Any], app_config: AppConfig,
                                                 overlay: str) -> None:
    """dev: CogVideoX-5b-I2V beside CogVideoX-2b; prod: CogVideoX1.5-5B-I2V beside CogVideoX-5b. Each an application
    of its own (its three stages: the VaeDecoder also encodes the image) with the same entry in the ingress's
    catalogue, no aliases (the Zhipu names stay on the text-to-video default)."""
    from serve.presets import preset_for

    name, family, repo = I2V_MODELS[overlay]
    apps = {a["name"]: a for a in serve_config["applications"]}
    app = apps.get(f"model-{name}")
    assert app is not None, f"{overlay}: no application model-{name} (got {sorted(apps)})"
    assert app["import_path"] == IMPORT_PATHS[0] and app["route_prefix"] is None
    assert {d["name"] for d in app["deployments"]} == {s.deployment for s in MODEL_STAGES}
    model = app["args"]["model"]
    assert (model["name"], model["family"], model.get("aliases", [])) == (name, family, [])
    assert model["source"].startswith("s3://") and model["source"].rstrip("/").endswith("/" + repo), model["source"]
    assert preset_for(family).image_input, f"{family} is not an image-to-video family"
    # the ingress's catalogue: a further model (not the default), the very entry its application loads
    [ingress] = apps["videogen"]["deployments"]
    catalogue = {m["name"]: m for m in ingress["user_config"].get("models", [])}
    assert catalogue.get(name) == model, f"{overlay}: the Ingress's user_config `models` lacks {name}'s entry"
    assert app_config.model.name != name and not preset_for(app_config.model.family).image_input
    served = app_config.model_named(name)
    assert served is not None and served.family == family and served.source == model["source"]
    # its Denoiser takes a whole GPU (the 5B transformer), its VaeDecoder shares one with a TextEncoder
    stages = {stage: opts for app_name, stage, opts in _stage_options(serve_config, app_config)
              if app_name == f"model-{name}"}
    assert stages["denoiser"].ray_actor_options.num_gpus == 1
    assert stages["text_encoder"].ray_actor_options.num_gpus + stages["vae_decoder"].ray_actor_options.num_gpus == 1


def test_enhanced_models_deploy_their_enhancer(serve_config: dict[str, Any], overlay: str) -> None:
    """An Enhancer section exactly in the applications of models with `enhance` (prod: CogVideoX-5b, SR x2 + RIFE;
    dev: none), on half a GPU, scaling from one replica."""
    enhanced = []
    for app in serve_config["applications"][:-1]:
        names = {d["name"] for d in app["deployments"]}
        has_enhance = app["args"]["model"].get("enhance") is not None
        assert names == {s.deployment for s in stages_for(has_enhance)}, app["name"]
        if has_enhance:
            enhanced.append(app["name"])
            [section] = [d for d in app["deployments"] if d["name"] == ENHANCER.deployment]
            assert section["ray_actor_options"]["num_gpus"] == 0.5
            assert section["autoscaling_config"]["min_replicas"] == 1
            enhance = app["args"]["model"]["enhance"]
            assert enhance["sr"]["source"].startswith("s3://") and enhance["interpolation"]["source"].startswith("s3://")
    assert enhanced == {"prod": ["model-cogvideox-5b"], "prod-2gpu": ["model-cogvideox-5b"], "dev": []}[overlay]


def test_ray_version_matches_the_project(rayservice: dict[str, Any]) -> None:
    pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins ray[serve]"
    assert _cluster(rayservice)["rayVersion"] == pin.group(1)


def test_all_ray_pods_run_the_projects_image(rayservice: dict[str, Any]) -> None:
    images = {_ray_container(t)["image"] for t in _templates(rayservice).values()}
    assert len(images) == 1, images
    assert images.pop().rpartition(":")[0].endswith("/videogen-serve"), "the overlay sets the registry and tag"


# ---- cluster shape ---------------------------------------------------------------------------------------------------

def test_head_runs_no_workloads(rayservice: dict[str, Any]) -> None:
    head = _cluster(rayservice)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GPU not in _ray_container(head["template"])["resources"]["limits"]
    assert rayservice["spec"].get("excludeHeadPodFromServeSvc") is True


def test_in_tree_autoscaling(rayservice: dict[str, Any]) -> None:
    cluster = _cluster(rayservice)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"


def test_worker_groups_never_restart_pods(rayservice: dict[str, Any]) -> None:
    # autoscaler v2 replaces a failed worker pod itself; a kubelet restart would hide the failure from it
    for name, group in _groups(rayservice).items():
        assert group["template"]["spec"].get("restartPolicy") == "Never", name


def test_each_stage_has_a_worker_group_sized_to_its_replicas(rayservice: dict[str, Any], app_config: AppConfig,
                                                             serve_config: dict[str, Any]) -> None:
    # every model's stages share the groups' slots: a group's pod range covers the sum of their replica ranges
    placement = _placement(rayservice, app_config, serve_config)
    for name, stages in placement.items():
        group = _groups(rayservice)[name]
        assert stages, f"worker group {name} hosts no deployment"
        # one pod holds one full set of its stages' slots, any model's replica in a slot: GPUs exactly used, CPUs
        # enough (so every model's replicas of one stage ask for the same GPUs and CPUs)
        # (a replica's amounts: `_replica_needs`, the sum of its placement group's bundles where it has them)
        kinds: dict[str, tuple[int, float, float]] = {}
        for stage, slots, opts in stages:
            gpus, cpus, _ = _replica_needs(opts)
            kind = kinds.setdefault(stage, (slots, gpus, cpus))
            assert kind == (slots, gpus, cpus), \
                f"{name}: {stage} replicas of different models ask for different amounts ({kind} vs {(slots, gpus, cpus)})"
        gpus = sum(slots * num_gpus for slots, num_gpus, _ in kinds.values())
        cpus = sum(slots * num_cpus for slots, _, num_cpus in kinds.values())
        assert math.isclose(_pod_gpus(group), gpus), f"{name}: {GPU} {_pod_gpus(group)} != replicas' {gpus}"
        if "num-gpus" in group["rayStartParams"]:  # what Ray advertises, when set: the pod's GPUs, no more or less
            assert math.isclose(float(group["rayStartParams"]["num-gpus"]), _pod_gpus(group)), name
        assert cpus <= _pod_cpus(group), f"{name}: replicas need {cpus} CPUs, a pod advertises {_pod_cpus(group)}"
        # Serve's replica range maps onto the group's pod range: per stage kind, all models' replicas together
        totals: dict[str, list[int]] = {}
        for stage, slots, opts in stages:
            low, high = _replica_range(opts)
            total = totals.setdefault(stage, [0, 0, slots])
            total[0] += low
            total[1] += high
        need_min = max(math.ceil(low / slots) for low, _, slots in totals.values())
        need_max = max(math.ceil(high / slots) for _, high, slots in totals.values())
        assert (group["minReplicas"], group["maxReplicas"]) == (need_min, need_max), \
            f"{name}: pods {group['minReplicas']}..{group['maxReplicas']}, Serve needs {need_min}..{need_max}"
        assert group.get("replicas", 0) == group["minReplicas"], name


def test_stage_groups_have_gpus_the_ingress_none(rayservice: dict[str, Any], app_config: AppConfig,
                                                 serve_config: dict[str, Any], overlay: str) -> None:
    placement = _placement(rayservice, app_config, serve_config)
    for name, group in _groups(rayservice).items():
        spec = group["template"]["spec"]
        limits = _ray_container(group["template"])["resources"]["limits"]
        gpu_tolerations = [t for t in spec.get("tolerations", []) if t.get("key") == GPU]
        if any(opts.ray_actor_options.num_gpus for _, _, opts in placement[name]):
            assert _quantity(limits[GPU]).is_integer() and _quantity(limits[GPU]) >= 1, name
            assert spec.get("nodeSelector"), f"{name}: GPU pods need a GPU node selector"
            assert any(t.get("effect") == "NoSchedule" and t.get("operator") == "Exists" for t in gpu_tolerations), \
                f"{name}: GPU pods tolerate the {GPU} taint"
            if overlay in PROD_OVERLAYS:
                assert spec["nodeSelector"] == H100, name
        else:
            assert GPU not in limits and not gpu_tolerations, f"{name}: a CPU group stays off GPU nodes"


def test_gcs_fault_tolerance_in_prod_only(rayservice: dict[str, Any], overlay: str) -> None:
    ft = _cluster(rayservice).get("gcsFaultToleranceOptions")
    if overlay not in PROD_OVERLAYS:
        assert ft is None
        return
    assert ft["redisAddress"]
    assert set(ft["redisPassword"]) == {"valueFrom"}, "the Redis password comes from a Secret"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]


def test_every_ray_container_runs_offline_and_exports_metrics(rayservice: dict[str, Any]) -> None:
    cluster = _cluster(rayservice)
    for params in [cluster["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in _groups(rayservice)
                                                                 .values())]:
        assert params.get("metrics-export-port") == "8080"
    for name, template in _templates(rayservice).items():
        container = _ray_container(template)
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("HF_HUB_OFFLINE", {}).get("value") == "1", name
        assert {"name": "metrics", "containerPort": 8080} in [
            {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]], name


def test_gpu_groups_mount_the_model_cache(rayservice: dict[str, Any], app_config: AppConfig,
                                          serve_config: dict[str, Any]) -> None:
    assert {m.cache_dir for m in app_config.all_models()} == {app_config.model.cache_dir}, "one cache for all models"
    for name, stages in _placement(rayservice, app_config, serve_config).items():
        if not any(opts.ray_actor_options.num_gpus for _, _, opts in stages):
            continue
        spec = _groups(rayservice)[name]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in _ray_container(_groups(rayservice)[name]["template"])
                  ["volumeMounts"]}
        volume = mounts.get(app_config.model.cache_dir)
        assert volume, f"{name}: nothing mounted at model.cache_dir {app_config.model.cache_dir}"
        source = next(v for v in spec["volumes"] if v["name"] == volume)
        assert "emptyDir" in source or "persistentVolumeClaim" in source, source


def _secret_mount(template: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    directory = str(Path(path).parent)
    for mount in _ray_container(template).get("volumeMounts", []):
        if mount["mountPath"] == directory:
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
            return mount, volume
    return None


def test_tenant_keys_and_webhook_secrets_are_directory_mounts_on_the_ingress(rayservice: dict[str, Any],
                                                                            app_config: AppConfig,
                                                                            serve_config: dict[str, Any]) -> None:
    placement = _placement(rayservice, app_config, serve_config)
    ingress_group = next(name for name, stages in placement.items() if any(s == "ingress" for s, _, _ in stages))
    files = {"keys": app_config.keys.keys_file, "webhooks": app_config.webhooks.secrets_file}
    assert files["keys"] == "/etc/videogen/keys/keys.json"
    assert files["webhooks"] == "/etc/videogen/webhooks/secrets.yaml"
    for what, path in files.items():
        for name, template in _templates(rayservice).items():
            found = _secret_mount(template, path)
            if name != ingress_group:
                assert found is None, f"{what} secret mounted on {name}: only the ingress reads it"
                continue
            assert found, f"{what}: no mount at {Path(path).parent} on the ingress group"
            mount, volume = found
            assert "subPath" not in mount, f"{what}: a subPath mount never sees the Secret's updates"
            assert mount.get("readOnly") is True
            assert volume["secret"]["secretName"], what


def test_s3_access_by_workload_identity(objects: tuple[dict[str, Any], ...], rayservice: dict[str, Any]) -> None:
    accounts = {o["metadata"]["name"]: o for o in _all(objects, "ServiceAccount")}
    for name, group in _groups(rayservice).items():
        account = group["template"]["spec"].get("serviceAccountName")
        assert account in accounts, f"{name} runs as {account!r}"
        arn = accounts[account]["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn
    assert not _all(objects, "Secret"), "no Secret objects in the manifests: they are created out of band"


AWS_KEY_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", r"aws_secret_access_key", r"aws_access_key_id", r"aws_session_token")]


def test_no_aws_keys_in_any_manifest(overlay: str) -> None:
    require_kubectl()
    texts = {f"rendered {overlay}": rendered_text(K8S / "overlays" / overlay)}
    texts |= {str(p.relative_to(ROOT)): p.read_text(errors="replace") for p in K8S.rglob("*") if p.is_file()}
    for extra in ("Dockerfile", ".dockerignore"):
        if (ROOT / extra).is_file():
            texts[extra] = (ROOT / extra).read_text()
    for where, text in texts.items():
        for pattern in AWS_KEY_PATTERNS:
            assert not pattern.search(text), f"{where}: matches {pattern.pattern}"


# ---- monitoring ------------------------------------------------------------------------------------------------------

def test_podmonitors_split_metrics_by_worker_group(objects: tuple[dict[str, Any], ...],
                                                   rayservice: dict[str, Any]) -> None:
    monitors = _all(objects, "PodMonitor")
    covered: set[str] = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        for name, template in _templates(rayservice).items():
            node_type = "head" if name == "head" else "worker"
            labels = {**template["metadata"]["labels"], "ray.io/node-type": node_type}
            if not all(labels.get(k) == v for k, v in selector.items()):
                continue
            covered.add(name)
            ports = {p["name"] for p in _ray_container(template)["ports"]}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in ports, f"{monitor['metadata']['name']}: {name} has no port {endpoint}"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert any(r.get("sourceLabels") == ["__meta_kubernetes_pod_label_ray_io_group"] and r.get("targetLabel")
                       and r.get("action", "replace").lower() == "replace" for r in endpoint.get("relabelings", [])), \
                f"{monitor['metadata']['name']}: ray.io/group is not relabelled onto the series"
    missing = set(_templates(rayservice)) - covered
    assert not missing, f"pods no PodMonitor scrapes: {missing}"


def test_dashboards_are_configmaps_for_the_grafana_sidecar(objects: tuple[dict[str, Any], ...]) -> None:
    files = sorted(DASHBOARDS.glob("*.json")) if DASHBOARDS.is_dir() else []
    assert files, f"no dashboards in {DASHBOARDS.relative_to(ROOT)} (the monitoring work writes them)"
    shipped: dict[str, str] = {}
    for cm in _all(objects, "ConfigMap"):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            shipped |= cm["data"]
            assert sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024, cm["metadata"]["name"]
    assert sorted(shipped) == [p.name for p in files]
    for path in files:
        assert shipped[path.name] == path.read_text(encoding="utf-8"), \
            f"{path.name} differs: run python k8s/sync_monitoring.py"


def test_prometheus_rule_is_the_alert_rules_file(objects: tuple[dict[str, Any], ...]) -> None:
    assert RULES.is_file(), f"{RULES.relative_to(ROOT)} is missing (the monitoring work writes it)"
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups, "the rules file has no groups"
    assert _one(objects, "PrometheusRule")["spec"]["groups"] == groups


def test_generated_monitoring_bundle_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("sync_monitoring", K8S / "sync_monitoring.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUTPUT.read_text(encoding="utf-8") == module.render(), \
        "k8s/base/monitoring.generated.yaml is stale: run python k8s/sync_monitoring.py"
