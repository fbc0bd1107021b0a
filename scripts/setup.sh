#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.videogen-installed ] || [ pyproject.toml -nt .venv/.videogen-installed ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU build here (a bare `torch` pulls a multi-GB CUDA build)
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[dev]"
  touch .venv/.videogen-installed
fi
