#!/bin/sh
# Install PyTorch into the given environment, picking the right build for this machine:
# the CUDA build (from PyPI) when an NVIDIA GPU answers, otherwise the much smaller CPU build.
# An installed torch is kept as it is (a user's own CUDA/ROCm build stays untouched).
# Usage: tools/install-torch.sh PATH/TO/pip    (TORCH_VERSION overrides the pinned version)
set -eu
PIP=$1
VERSION=${TORCH_VERSION:-2.13.0}
if "$PIP" show torch >/dev/null 2>&1; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install-torch: NVIDIA GPU found, installing the CUDA build torch==$VERSION"
  "$PIP" install "torch==$VERSION"
else
  echo "install-torch: no GPU found, installing the CPU build torch==$VERSION+cpu"
  # a CPU wheel the configured indexes / find-links already hold (a local mirror, a wheel cache)
  # first, quietly; else PyTorch's CPU index
  "$PIP" install -q "torch==$VERSION+cpu" 2>/dev/null ||
    "$PIP" install "torch==$VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
