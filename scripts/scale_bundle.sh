#!/usr/bin/env bash
# Prepare (here, with the package registry) or use (on an offline host) a small bundle that lets
# benchmarks/scale_check.py run on a machine that has Python, numpy, psutil, torch, onnx, scipy,
# networkx, rich and tabulate but no OpenVINO, no NNCF and no network.
#
#   scripts/scale_bundle.sh [--python 3.12] [--dir build/scale_bundle]      # prepare: stripped wheels
#   scripts/scale_bundle.sh --run [--dir build/scale_bundle] [-- scale_check args]   # on the host
#
# Prepare downloads the OpenVINO and NNCF wheels of the versions installed here (for the given Python,
# manylinux x86-64) plus the pure-Python packages NNCF imports that such a host lacks, then rewrites the
# OpenVINO wheel without what a CPU-only run never loads (GPU and NPU plugins, the TensorFlow, TF-Lite,
# Paddle, JAX, GGUF and ONNX frontends, the GPU kernel cache) as a valid wheel (RECORD rewritten). The
# CPU plugin, the IR frontend and the PyTorch frontend (ov.convert_model of a torch module) stay.
# The bundle folder is under build/ (git-ignored): name it as a carry path when copying the tree.
# --run installs nothing: it extracts the wheels (once) into $SCALE_BUNDLE_SITE (default
# /tmp/parnet-scale-bundle-site) and runs the scale check with that on PYTHONPATH; results go to
# benchmarks/results/scale/... and to $OUT when set.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY_VERSION=""
DIR="$REPO/build/scale_bundle"
RUN=0
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY_VERSION="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --run) RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$RUN" = 1 ]; then
  ls "$DIR"/*.whl >/dev/null 2>&1 || { echo "no wheels in $DIR: prepare the bundle first" >&2; exit 2; }
  # extracted outside the bundle folder (~130 MB unpacked), so a copied tree never carries it
  SITE="${SCALE_BUNDLE_SITE:-${TMPDIR:-/tmp}/parnet-scale-bundle-site}"
  WHEELS="$(cd "$DIR" && ls *.whl | sort | tr '\n' ' ')"
  if [ ! -f "$SITE/.complete" ] || [ "$(cat "$SITE/.complete")" != "$WHEELS" ]; then
    rm -rf "$SITE"
    "$PYTHON" - "$DIR" "$SITE" <<'EOF'
import sys, zipfile
from pathlib import Path
d, site = Path(sys.argv[1]), Path(sys.argv[2])
for whl in sorted(d.glob("*.whl")):
    zipfile.ZipFile(whl).extractall(site)
EOF
    printf '%s' "$WHEELS" > "$SITE/.complete"
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PYTHON" "$REPO/benchmarks/scale_check.py" "$@"
fi

PY_VERSION="${PY_VERSION:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
OV_VERSION="$("$PYTHON" -c 'import openvino; print(openvino.__version__.split("-")[0])')"
NNCF_VERSION="$("$PYTHON" -c 'import nncf; print(nncf.__version__)')"
mkdir -p "$DIR"
DL="$(mktemp -d)"
trap 'rm -rf "$DL"' EXIT
# NNCF's imports that the host lacks (its other requirements: numpy, scipy, networkx, rich, tabulate,
# psutil are there; pillow is too, bundled anyway since the project imports it on the quantization
# path and a bare venv lacks it). scikit-learn and ninja are only needed by algorithms the scale check
# does not run (weight compression, torch extensions).
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DL" \
  "openvino==$OV_VERSION" "nncf==$NNCF_VERSION" openvino-telemetry pydot pyparsing packaging safetensors pillow
"$PYTHON" - "$DL" "$DIR" <<'EOF'
"""Copy the wheels into the bundle, the OpenVINO one without the parts a CPU run never loads."""
import base64, hashlib, shutil, sys, zipfile
from pathlib import Path

DROP = ("libopenvino_intel_gpu_plugin", "libopenvino_intel_npu_plugin", "libopenvino_tensorflow_frontend",
        "libopenvino_tensorflow_lite_frontend", "libopenvino_paddle_frontend", "libopenvino_jax_frontend",
        "libopenvino_gguf_frontend", "libopenvino_onnx_frontend", "openvino/libs/cache.json",
        "openvino/frontend/tensorflow/", "openvino/frontend/paddle/", "openvino/frontend/jax/",
        "openvino/frontend/onnx/")
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for old in dst.glob("*.whl"):
    old.unlink()  # a previous bundle's wheels (only *.whl in the bundle folder, which this script owns)
for whl in sorted(src.glob("*.whl")):
    if not whl.name.startswith("openvino-2"):
        shutil.copy(whl, dst / whl.name)
        continue
    zin = zipfile.ZipFile(whl)
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    kept, lines = [], []
    with zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if info.filename == record or any(d in info.filename for d in DROP):
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        zout.writestr(record, "\n".join(lines) + "\n")
    print(f"{whl.name}: {whl.stat().st_size / 1e6:.1f} MB -> {(dst / whl.name).stat().st_size / 1e6:.1f} MB")
EOF
du -sh "$DIR"/*.whl | sort -h
echo "bundle: $(du -sm "$DIR" | cut -f1) MB in $DIR (python $PY_VERSION, openvino $OV_VERSION, nncf $NNCF_VERSION)"
