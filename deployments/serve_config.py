"""The Serve config file (configs/*.yaml, the RayService's serveConfigV2) and the one `AppConfig` it holds.

Why one Serve application per model: Ray Serve hashes an application's whole `args` (and each deployment's
autoscaling `policy`) into its code version, and a new code version restarts every replica of the
application. One application whose `args` listed every model would reload every model when one of them
changes. So each model is its own application, `model-<name>`, whose `args` are only what it loads (the
model entry and S3); the ingress application (`videogen`) has only S3 in its `args` and reaches the stages
with `serve.get_deployment_handle(stage, "model-<name>")`. Everything else is a per-deployment section that
Serve applies to running replicas: `num_replicas`, `autoscaling_config`, queue, shutdown and health-check
fields, and `user_config` (the Ingress's `IngressSettings`, the stages' `StageSettings`), which reaches
`reconfigure` without a restart. `ray_actor_options` (GPUs, resources) restarts that deployment's replicas.

No Ray import here: tests, tools and the local launcher build and check files without starting anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve.config import (
    AppConfig,
    DeploymentOptions,
    DeploymentsConfig,
    IngressArgs,
    IngressSettings,
    ModelAppArgs,
    ModelConfig,
    StageSettings,
)
from serve.config.app import model_app_name
from serve.stages.stage import DENOISER, ENHANCER, Stage, stages_for

INGRESS_APP = "videogen"
INGRESS_DEPLOYMENT = "Ingress"
MODEL_ROOT = "Model"  # the root of a model's application: holds its three stage handles
BUILD_MODEL_APP = "deployments.app:build_model_app"
BUILD_INGRESS_APP = "deployments.app:build_app"
# Serve's logging_config (ray.serve.schema.LoggingConfig) of every application, and of the proxies and the
# controller: JSON, so a line's fields beside its message (the job_id and tenant of the job it is about:
# serve/logcontext.py; Serve's request_id, replica) stay fields. TEXT writes the message only. Not part of an
# application's code version: changing it reconfigures running replicas.
LOGGING_CONFIG: dict[str, Any] = {"encoding": "JSON", "log_level": "INFO"}


def settings_json(settings: IngressSettings) -> dict[str, Any]:
    """`IngressSettings` as the JSON `user_config` Serve carries (plain API keys included, not masked)."""
    data = settings.model_dump(mode="json")
    data["api"]["api_keys"] = [k.get_secret_value() for k in settings.api.api_keys]
    return data


def _section(name: str, options: DeploymentOptions, user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    section = {"name": name, **options.to_serve_options()}
    if user_config is not None:
        section["user_config"] = user_config
    return section


def stage_options(deployments: DeploymentsConfig, stage: Stage, model: ModelConfig) -> DeploymentOptions:
    """A stage's options in `model`'s application: a Denoiser of several ranks (model.parallel) reserves one
    placement group bundle per rank (DeploymentOptions.with_ranks)."""
    options = getattr(deployments, stage.key)
    return options.with_ranks(model.parallel.world_size) if stage is DENOISER else options


def model_application(config: AppConfig, model: ModelConfig, runtime_env: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """One model's Serve application: its stages' sections, `args` = what they load."""
    stage_settings = StageSettings(progress_interval_s=config.jobs.progress_interval_s).model_dump(mode="json")
    app: dict[str, Any] = {
        "name": model_app_name(model.name), "route_prefix": None, "import_path": BUILD_MODEL_APP,
        "logging_config": dict(LOGGING_CONFIG),
        "args": ModelAppArgs(model=model, s3=config.s3).model_dump(mode="json"),
        "deployments": [_section(stage.deployment, stage_options(config.deployments, stage, model), stage_settings)
                        for stage in stages_for(model.enhance is not None)],
    }
    if runtime_env:
        app["runtime_env"] = runtime_env
    return app


def ingress_application(config: AppConfig, runtime_env: dict[str, Any] | None = None,
                        route_prefix: str = "/") -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": INGRESS_APP, "route_prefix": route_prefix, "import_path": BUILD_INGRESS_APP,
        "logging_config": dict(LOGGING_CONFIG),
        "args": IngressArgs(s3=config.s3).model_dump(mode="json"),
        "deployments": [_section(INGRESS_DEPLOYMENT, config.deployments.ingress, settings_json(config.settings()))],
    }
    if runtime_env:
        app["runtime_env"] = runtime_env
    return app


def serve_config(config: AppConfig, *, runtime_env: dict[str, Any] | None = None,
                 http_options: dict[str, Any] | None = None, proxy_location: str | None = None) -> dict[str, Any]:
    """The multi-application Serve config (what `serve deploy` and KubeRay take) for `config`."""
    out: dict[str, Any] = {}
    if proxy_location:
        out["proxy_location"] = proxy_location
    if http_options:
        out["http_options"] = http_options
    out["logging_config"] = dict(LOGGING_CONFIG)
    out["applications"] = [*(model_application(config, m, runtime_env) for m in config.all_models()),
                           ingress_application(config, runtime_env)]
    return out


def _options(section: dict[str, Any] | None, default: DeploymentOptions) -> DeploymentOptions:
    """A deployment's options: its section's fields over the code's defaults (as Serve applies them)."""
    fields = {k: v for k, v in (section or {}).items() if k not in ("name", "user_config")}
    return DeploymentOptions.model_validate({**default.model_dump(exclude_none=True), **fields})


def _app(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((a for a in data.get("applications") or [] if a.get("name") == name), None)


def _sections(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app.get("deployments") or []}


def check_serve_config(data: dict[str, Any]) -> AppConfig:
    """Validate a Serve config file as this service reads it; the `AppConfig` it describes.

    Checks what Serve cannot: every model of the ingress's catalogue has its application, deployed from the
    same model entry (the ingress validates requests against that entry, the stages load it); no model
    application is left without a catalogue entry; every section names a deployment that exists; all share
    one bucket. The stage options returned are the default model's (others may differ per application).
    """
    ingress = _app(data, INGRESS_APP)
    if ingress is None:
        raise ValueError(f"no application named {INGRESS_APP!r} (the ingress, import_path {BUILD_INGRESS_APP})")
    args = IngressArgs.model_validate(ingress.get("args") or {})
    sections = _sections(ingress)
    unknown = set(sections) - {INGRESS_DEPLOYMENT}
    if unknown:
        raise ValueError(f"application {INGRESS_APP!r} has no deployment {sorted(unknown)}")
    ingress_section = sections.get(INGRESS_DEPLOYMENT, {"name": INGRESS_DEPLOYMENT})
    settings = IngressSettings.model_validate(ingress_section.get("user_config") or {})
    stage_options: dict[str, DeploymentOptions] = {}
    wanted = {model_app_name(m.name): m for m in settings.all_models()}
    for app in data.get("applications") or []:
        if app.get("name") == INGRESS_APP:
            continue
        if app.get("import_path") != BUILD_MODEL_APP or app.get("name") not in wanted:
            raise ValueError(f"application {app.get('name')!r} is not a model of the ingress's catalogue "
                             f"(Ingress user_config `model`/`models`: {sorted(wanted)})")
    for name, model in wanted.items():
        app = _app(data, name)
        if app is None:
            raise ValueError(f"model {model.name!r} has no application {name!r} ({BUILD_MODEL_APP})")
        margs = ModelAppArgs.model_validate(app.get("args") or {})
        if margs.model.model_dump() != model.model_dump():
            raise ValueError(f"application {name!r}: args.model differs from the Ingress catalogue's entry for "
                             f"{model.name!r}; they must be the same model entry")
        if margs.s3.model_dump() != args.s3.model_dump():
            raise ValueError(f"application {name!r}: args.s3 differs from the ingress's; one bucket serves all")
        sections = _sections(app)
        stages = stages_for(model.enhance is not None)
        unknown = set(sections) - {s.deployment for s in stages} - {MODEL_ROOT}
        if unknown:
            why = " (only a model with `enhance` has an Enhancer)" if ENHANCER.deployment in unknown else ""
            raise ValueError(f"application {name!r} has no deployment {sorted(unknown)}{why}")
        defaults = DeploymentsConfig()
        options = {s.key: _options(sections.get(s.deployment), getattr(defaults, s.key))  # every model's, checked
                   for s in stages}
        try:  # a parallel model's Denoiser: one bundle per rank, when the section gives them
            options[DENOISER.key].with_ranks(model.parallel.world_size)
        except ValueError as exc:
            raise ValueError(f"application {name!r}, deployment {DENOISER.deployment!r}: {exc}") from None
        for stage in stages:
            StageSettings.model_validate((sections.get(stage.deployment) or {}).get("user_config") or {})
        if model.name == settings.model.name:
            stage_options = options
    deployments = DeploymentsConfig(ingress=_options(ingress_section, DeploymentsConfig().ingress), **stage_options)
    return AppConfig.from_parts(settings, args.s3, deployments)


def normalised(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Serve config file whose `args` and `user_config`s are validated and written out in full
    (relative paths resolved here, every default spelled out), so replicas on other machines or in other
    working directories read exactly what was checked."""
    check_serve_config(data)
    out = {**data, "applications": []}
    for app in data["applications"]:
        app = {**app, "deployments": [dict(d) for d in app.get("deployments") or []]}
        if app["name"] == INGRESS_APP:
            app["args"] = IngressArgs.model_validate(app.get("args") or {}).model_dump(mode="json")
            for d in app["deployments"]:
                if d["name"] == INGRESS_DEPLOYMENT:
                    d["user_config"] = settings_json(IngressSettings.model_validate(d.get("user_config") or {}))
        else:
            app["args"] = ModelAppArgs.model_validate(app.get("args") or {}).model_dump(mode="json")
            for d in app["deployments"]:
                if d["name"] != MODEL_ROOT:
                    d["user_config"] = StageSettings.model_validate(d.get("user_config") or {}).model_dump(mode="json")
        out["applications"].append(app)
    return out


def load_app_config(path: str | Path) -> AppConfig:
    """A Serve config file (configs/*.yaml) checked and read back as one `AppConfig`."""
    return check_serve_config(yaml.safe_load(Path(path).read_text()) or {})
