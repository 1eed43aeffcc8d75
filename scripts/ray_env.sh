#!/usr/bin/env bash
# Build the optional Ray environment (`parnet-cpu[ray]`: Ray Serve + Ray Data) and run tests/ray in it.
# Ray (~580 MB with pyarrow and pandas) never enters the base install, so it gets its own virtual environment.
# Where this Python already has parnet-cpu installed from this tree (scripts/install.sh), the venv sees it
# (--system-site-packages, without a pip of its own so nothing of the base install is shadowed) and only Ray
# is added; elsewhere the venv gets a full install of '.[test,ray]'. Either way `pip check` must be clean.
# Usage: bash scripts/ray_env.sh [VENV_DIR] [PYTEST_ARGS...]   (default ~/.cache/parnet-cpu/ray-venv)
# Exit status: that of the tests, 90 when the environment could not be installed, 91 when pip check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-$HOME/.cache/parnet-cpu/ray-venv}"
shift $(( $# > 0 ? 1 : 0 ))
RAY_REQ="$(python3 - <<'EOF'
import tomllib
print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ray"][0])
EOF
)" || { echo "ray_env: cannot read the 'ray' extra from pyproject.toml" >&2; exit 90; }
start=$(date +%s)
if python3 -c "import parnet_cpu, sys; sys.exit(not parnet_cpu.__file__.startswith('$PWD/'))" 2>/dev/null; then
  mode="Ray over this Python's install of parnet-cpu"
  { [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages --without-pip "$VENV"; } \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$RAY_REQ" \
    || { echo "ray_env: could not install $RAY_REQ in $VENV" >&2; exit 90; }
else
  mode="full install of .[test,ray]"
  { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,ray]' \
    || { echo "ray_env: could not install .[test,ray] in $VENV" >&2; exit 90; }
fi
echo "ray_env: $mode ready in $(( $(date +%s) - start )) s, venv $(du -sh "$VENV" | cut -f1)"
"$VENV/bin/python" -m pip check || { echo "ray_env: pip check fails with $RAY_REQ" >&2; exit 91; }
"$VENV/bin/python" -m pytest -q tests/ray "$@"
