#!/usr/bin/env bash
# Install parnet-cpu and everything it needs into the current Python environment.
# torch first: 2.13.0 is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# The demo's real data (Fashion-MNIST, MIT) comes from Debian's dataset-fashion-mnist where apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" = none ] || ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }; then
    echo "note: could not install dataset-fashion-mnist (needs root); the demo falls back to the shipped photos" >&2
  fi
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[full,test]'
