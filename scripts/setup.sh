#!/usr/bin/env bash
# Set up (or refresh) .venv with the project installed. Idempotent: a second run installs nothing.
# Without an NVIDIA driver torch is pinned to 2.13.0 (the CPU wheel on this workplace's disk); with one,
# pip's default CUDA build is installed. A torch already in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.ptuning-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      .venv/bin/pip install -q "torch>=2.4,<2.15"
    else
      .venv/bin/pip install -q "torch==2.13.0"
    fi
  fi
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Headless Chromium for the MLflow UI test (Debian's package); skipped where apt is not ours to use.
if [ "${PTUNING_SKIP_APT:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium could not be installed; the MLflow UI test will be skipped" >&2
fi
