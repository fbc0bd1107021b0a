#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras, and the client (client/). Idempotent.
# --test-tools also installs the system tools the tests need (kubectl, Prometheus, nginx).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# system tools the tests use: kubectl (renders the kustomize overlays), Prometheus/promtool (the
# observability test) and nginx (tests/k8s/test_proxy.py runs the front proxy's shipped nginx.conf, its own
# instance on free local ports). Debian's kubernetes-client conflicts with an already installed kubectl, so only
# install what is missing.
missing=()
[ "${1:-}" = "--test-tools" ] && {
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
}
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (Debian packages) for the k8s and observability tests" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.videogen-installed ] || [ pyproject.toml -nt .venv/.videogen-installed ] \
   || [ client/pyproject.toml -nt .venv/.videogen-installed ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU build here (a bare `torch` pulls a multi-GB CUDA build)
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[dev]"
  # spandrel (super-resolution, serve/stages/super_resolution.py) without its dependencies: it declares
  # torchvision, which has no CPU build for this torch (PyPI's fails at import, newer ones pull a CUDA torch);
  # its other requirements are in pyproject.toml, and only two unserved architectures need torchvision
  python -m pip install -q --no-deps "spandrel==0.4.2"
  # the client is its own distribution (httpx only); the quick start and the tests use it
  python -m pip install -q -e ./client
  touch .venv/.videogen-installed
fi
