#!/usr/bin/env bash
# One command on a fresh machine: environment, then the default test run (unit, stages, integration;
# GPU tests skip without CUDA). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test-tools
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec python -m pytest -q -p no:cacheprovider "$@"
