# The image every pod of the RayService runs (head, ingress, GPU stages): Ray's own GPU image, so Ray, Python and
# the CUDA user space are what KubeRay and the Ray autoscaler expect, plus torch built for that CUDA and this project.
#
#   docker build -t registry.example.com/videogen/videogen-serve:0.1.0 .
#   docker push registry.example.com/videogen/videogen-serve:0.1.0   # then set images: in k8s/overlays/*
#
# RAY_VERSION must equal pyproject.toml's ray[serve] pin and the RayService's rayVersion, TORCH_VERSION the pin in
# scripts/setup.sh (tests/k8s/test_dockerfile.py checks both). CUDA_TAG picks the image's CUDA (Ray publishes
# -cuXYZ tags; -gpu is an alias of one of them) and the matching torch wheel index; the build stops if they differ.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu128
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}

ARG RAY_VERSION
ARG CUDA_TAG
ARG TORCH_VERSION=2.13.0

# the base must be the Ray and the CUDA we build for (CUDA_VERSION comes from the nvidia/cuda base, e.g. 12.8.1)
RUN test "cu$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr -d .)" = "${CUDA_TAG}" \
      || { echo "base image has CUDA ${CUDA_VERSION}, CUDA_TAG is ${CUDA_TAG}" >&2; exit 1; } \
 && python -c "import ray, sys; \
sys.exit(0 if ray.__version__ == '${RAY_VERSION}' else 'base image has ray ' + ray.__version__)"

# torch first, from the index of the image's CUDA: `pip install .` would otherwise resolve torch from PyPI
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"

WORKDIR /home/ray/videogen
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users configs ./configs
# the project and its other dependencies (ray[serve] and torch are already satisfied and stay as they are)
# spandrel (super-resolution) with --no-deps: its torchvision requirement must never let pip swap torch; its
# other requirements come with the project, and only two unserved architectures use torchvision
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps "spandrel==0.4.2" \
 && python -c "import torch, ray, deployments.app; assert torch.version.cuda, 'torch has no CUDA'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)"

# pods load weights from model.source (s3:// or a mounted directory), never from the Hugging Face Hub at run time;
# the import path deployments.app:build_app works from any directory (the project is installed, not just copied)
ENV HF_HUB_OFFLINE=1
