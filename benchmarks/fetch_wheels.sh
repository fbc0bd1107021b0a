#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks into .whl/ (git-ignored), for
#   device run: carry [".whl"], command "bash benchmarks/run_on_gpu.sh"
# The machine's image (python 3.12, torch 2.11, accelerate 1.15, transformers 5.17, tokenizers 0.23,
# huggingface-hub 1.33, numpy, safetensors, pillow, regex, pytest; see the device notes) has no
# diffusers, torchao or pydantic (it has peft); pytest-timeout gives the GPU tests a per-test limit.
# transformers is carried to run the version the CPU tests run (5.24),
# with the regex it checks for at import (>= 2025.10.22; the image's version is not known here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  diffusers==0.42.1 \
  transformers==5.24.0 regex==2026.11.19 \
  torchao==0.18.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  pytest-timeout==2.4.0
# torchao 0.18 loads its C++ extensions for torch >= 2.11 (the machine's); fp8 itself runs on torch._scaled_mm.
du -sh .whl && ls .whl
