#!/usr/bin/env bash
# Create a virtual environment and install mtlora with its test, eval and qlora (bitsandbytes) extras.
# On machines without CUDA the CPU build of torch is installed first (pinned), so that the loose
# `torch` requirement of the package does not pull several GB of CUDA wheels.
set -euo pipefail
VENV=${1:-.venv}
PY=${2:-python3}
TORCH_CPU_VERSION=${MTLORA_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch
  else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==${TORCH_CPU_VERSION}" \
      || "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==${TORCH_CPU_VERSION}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,eval,qlora]"
