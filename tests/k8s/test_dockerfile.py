"""The Dockerfile (cannot be built here: no Docker daemon): its base is the Ray GPU image of the pinned Ray, torch
is installed for the image's CUDA before the project, and the build context is an allow-list."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.MULTILINE))


def _from() -> str:
    (line,) = re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE)
    return re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], line)


def test_base_is_the_ray_gpu_image_of_the_pinned_ray() -> None:
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    image = _from()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py3\d+-(cu\d{{3}}|gpu)", image), image


def test_torch_matches_the_images_cuda_and_comes_before_the_project() -> None:
    args = _args()
    assert args["CUDA_TAG"] in _from()
    torch_at = DOCKERFILE.index('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
    assert "https://download.pytorch.org/whl/${CUDA_TAG}" in DOCKERFILE[torch_at:].splitlines()[0]
    assert torch_at < DOCKERFILE.index("pip install --no-cache-dir .")
    setup_pin = re.search(r"TORCH_VERSION:-([\d.]+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert setup_pin and args["TORCH_VERSION"] == setup_pin.group(1), "same torch as scripts/setup.sh"


def test_build_context_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "serve", "deployments"} <= allowed
    assert not allowed & {".venv", "models", "out", ".git", "tests"}
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE, re.MULTILINE):
        assert set(copied.split()) <= allowed, copied
