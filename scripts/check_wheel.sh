#!/usr/bin/env bash
# The full install as a user gets it from a wheel, not from this checkout: build the wheel, install it
# with the `full` extra into a fresh virtual environment, and run the README's main job from an empty
# folder (the demo's fallback photos must come from the package data). Prints the venv's size.
# Usage: bash scripts/check_wheel.sh [WORK_DIR]     (CI runs it; ~2-3 min)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/parnet_cpu-*.whl)"
python3 -m venv "$work/full-venv"
pip="$work/full-venv/bin/pip"
"$pip" install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel first (see scripts/install.sh)
"$pip" install -q --disable-pip-version-check "$wheel[full]"
mkdir -p "$work/empty" && cd "$work/empty"
"$work/full-venv/bin/parnet-cpu" --version
"$work/full-venv/bin/parnet-cpu" demo --test-limit 1000 --quick
echo "check_wheel: demo ran from the wheel; full venv $(du -sh "$work/full-venv" | cut -f1)"
