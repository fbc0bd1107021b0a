"""Fixtures of the k8s manifest tests: each overlay rendered once (module scope, parametrized over OVERLAYS), its
RayService, and the Serve application config the RayService carries."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from serve.config import AppConfig
from tests.k8s.kube import K8S, OVERLAYS, render, require_kubectl


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    require_kubectl()
    return render(K8S / "overlays" / overlay)


@pytest.fixture(scope="module")
def rayservice(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == "RayService"]
    assert len(found) == 1, f"expected one RayService, got {[o['metadata']['name'] for o in found]}"
    return found[0]


@pytest.fixture(scope="module")
def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    raw = rayservice["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a string holding the Serve config YAML"
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def app_config(serve_config: dict[str, Any]) -> AppConfig:
    from deployments.serve_config import check_serve_config

    return check_serve_config(serve_config)  # the ingress's settings and the default model's stage options
