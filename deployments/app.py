"""The Serve applications: one per model (`build_model_app`) beside the ingress (`build_app`).

Why this shape: see deployments/serve_config.py. A model's application is its three stage deployments (and the Enhancer, for a
model with `enhance`) under
a tiny root (`Model`, which holds their handles so Serve deploys them); its `args` (`ModelAppArgs`) are only
the model entry and S3. The ingress application's `args` (`IngressArgs`) are only S3; its settings are the
Ingress deployment's `user_config`. Deployment classes stay undecorated here: the defaults below are
the code's, and each deployment's section of the Serve config file (`applications[].deployments[]`)
overrides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.denoiser import Denoiser
from deployments.enhancer import Enhancer
from deployments.ingress import Ingress
from deployments.serve_config import (
    INGRESS_DEPLOYMENT,
    MODEL_ROOT,
    settings_json,
    stage_options,
)
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VaeDecoder
from serve.config import DeploymentsConfig, IngressArgs, IngressSettings, ModelAppArgs
from serve.stages.stage import (
    DENOISER,
    ENHANCER,
    TEXT_ENCODER,
    VAE_DECODER,
    Stage,
    stages_for,
)

_CLASSES = {TEXT_ENCODER: TextEncoder, DENOISER: Denoiser, VAE_DECODER: VaeDecoder, ENHANCER: Enhancer}


class Model:
    """Root of a model's application: it only holds the stage handles, so that Serve deploys the stages."""

    def __init__(self, *stages: Any) -> None:
        self._stages = stages


def build_model_app(args: ModelAppArgs | dict[str, Any]) -> Application:
    """One model's application (`serve deploy`: `import_path: deployments.app:build_model_app`, `args`:
    `ModelAppArgs`). Name it `model-<model name>`: the ingress reaches its stages by that name. (Serve calls an
    application builder with exactly one argument: the options are `model_application`'s.)"""
    return model_application(args)


def model_application(args: ModelAppArgs | dict[str, Any], classes: Mapping[Stage, type] | None = None,
                      deployments: DeploymentsConfig | None = None) -> Application:
    """`build_model_app` from Python (`serve.run`): `classes` replaces a stage's deployment class (the serving
    benchmark injects stages that sleep instead of computing, benchmarks/serving_benchmark.py) and `deployments`
    the code's default options; a Serve config file's sections override either, as for the defaults."""
    margs = args if isinstance(args, ModelAppArgs) else ModelAppArgs.model_validate(args)
    data = margs.model_dump(mode="json")
    defaults = deployments or DeploymentsConfig()
    chosen = {**_CLASSES, **(classes or {})}
    stages = [serve.deployment(chosen[stage], name=stage.deployment,
                               **stage_options(defaults, stage, margs.model).to_serve_options()).bind(data)
              for stage in stages_for(margs.model.enhance is not None)]
    root = serve.deployment(Model, name=MODEL_ROOT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=16, graceful_shutdown_timeout_s=5)
    return root.bind(*stages)


def build_app(args: IngressArgs | dict[str, Any] | None = None) -> Application:
    """The ingress application (`import_path: deployments.app:build_app`, `args`: `IngressArgs`); its
    deployment's `user_config` is the `IngressSettings`."""
    return ingress_application(args)


def ingress_application(args: IngressArgs | dict[str, Any] | None = None, settings: IngressSettings | None = None,
                        deployments: DeploymentsConfig | None = None) -> Application:
    """`build_app` from Python: `settings` gives the deployment its `user_config` at once, `deployments` its
    options."""
    iargs = args if isinstance(args, IngressArgs) else IngressArgs.model_validate(args or {})
    extra = {} if settings is None else {"user_config": settings_json(settings)}
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT,
                               **(deployments or DeploymentsConfig()).ingress.to_serve_options(), **extra)
    return ingress.bind(iargs.model_dump(mode="json"))


def __getattr__(name: str) -> Application:
    """Applications built from the defaults, for `serve build` (it accepts only `Application`s, no `args`):

        serve build deployments.app:model_app deployments.app:app -o serve.yaml

    then rename `app1` to `model-cogvideox-tiny-2b` (and drop its route_prefix) and `app2` to `videogen`, as
    `serve build` itself says. `app` carries the default `IngressSettings` as its user_config, so the file
    shows every run-time setting. Built on first use, not by every import of this module."""
    if name == "model_app":
        return build_model_app(ModelAppArgs())
    if name == "app":
        return ingress_application(IngressArgs(), settings=IngressSettings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
