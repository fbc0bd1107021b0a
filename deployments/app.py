"""`build_app(config)`: the import path for `serve run`, `serve deploy` and the KubeRay RayService.

Deployment classes stay undecorated; every option (replicas, autoscaling, GPUs, queue limits,
graceful shutdown) comes from the typed `AppConfig`.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from deployments.denoiser import Denoiser
from deployments.ingress import Ingress
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VaeDecoder
from serve.config import AppConfig


def build_app(args: AppConfig) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    d = config.deployments
    text_encoder = serve.deployment(TextEncoder, name="TextEncoder", **d.text_encoder.to_serve_options())
    denoiser = serve.deployment(Denoiser, name="Denoiser", **d.denoiser.to_serve_options())
    vae_decoder = serve.deployment(VaeDecoder, name="VaeDecoder", **d.vae_decoder.to_serve_options())
    ingress = serve.deployment(Ingress, name="Ingress", **d.ingress.to_serve_options())
    return ingress.bind(config, text_encoder.bind(config), denoiser.bind(config), vae_decoder.bind(config))
