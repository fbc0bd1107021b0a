#!/usr/bin/env bash
# One command on a fresh machine: environment, tiny model, local S3, Serve app, one sample video.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing} AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
exec python -m deployments.local "$@"
