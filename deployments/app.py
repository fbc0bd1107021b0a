"""`build_app(config)`: the import path for `serve run`, `serve deploy` and the KubeRay RayService.

Deployment classes stay undecorated; every option (replicas, autoscaling, GPUs, queue limits,
graceful shutdown) comes from the typed `AppConfig`. Each served model gets its own three stage
deployments (`TextEncoder`, `Denoiser`, `VaeDecoder` for the default model, `<Stage>-<name>` for others).
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from deployments.denoiser import Denoiser
from deployments.ingress import Ingress
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VaeDecoder
from serve.config import AppConfig
from serve.stages.stage import DENOISER, STAGES, TEXT_ENCODER, VAE_DECODER


def build_app(args: AppConfig) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    d = config.deployments
    classes = {TEXT_ENCODER: TextEncoder, DENOISER: Denoiser, VAE_DECODER: VaeDecoder}
    stages = {}
    for model in config.all_models():
        suffix = config.stage_suffix(model)
        stages[model.name] = [
            serve.deployment(classes[stage], name=f"{stage.deployment}{suffix}",
                             **getattr(d, stage.key).to_serve_options()).bind(config, model.name)
            for stage in STAGES
        ]
    ingress = serve.deployment(Ingress, name="Ingress", **d.ingress.to_serve_options())
    return ingress.bind(config, stages)


def __getattr__(name: str) -> Application:
    """`app`: the application built from the defaults, for `serve build deployments.app:app -o serve.yaml`
    (it accepts only an `Application`, no `args`); built on first use, not by every import of this module.
    Deploy with the `build_app` builder and your `args` (configs/*.yaml)."""
    if name == "app":
        return build_app(AppConfig())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
