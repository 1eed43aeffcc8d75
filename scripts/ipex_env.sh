#!/usr/bin/env bash
# Build the optional IPEX environment and run the IPEX backend tests in it.
# IPEX 2.8 (its last release) needs torch 2.8, which conflicts with the default install (torch 2.13),
# so it gets its own virtual environment; its runtime needs Intel OpenMP preloaded.
# Usage: bash scripts/ipex_env.sh [VENV_DIR]   (default .venv-ipex; ~7 GB, pip takes a CUDA build of torch 2.8)
# Exit status: that of the tests, or 90 when the environment could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-ipex}"
start=$(date +%s)
{ [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } \
  && "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.8.0 intel-extension-for-pytorch==2.8.0 intel-openmp \
  && "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[full,test]' \
  || { echo "ipex_env: could not install the IPEX environment in $VENV" >&2; exit 90; }
echo "ipex_env: environment ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
export LD_PRELOAD="$(cd "$VENV" && pwd)/lib/libiomp5.so"
"$VENV/bin/python" -m pytest -q tests/ipex
