#!/usr/bin/env bash
# Prepare the wheel folder tools/device_check.sh installs from, on the GPU machine that has no
# network: nat_mm itself, NATTEN (pure Python: its CUDA kernels need a long source build) and the
# pure-Python packages nat_mm needs that the machine lacks (mmengine and its small dependencies).
# Everything else (torch, triton, timm, numpy, safetensors, pillow, pytest, opencv) is there.
#
#   bash tools/prepare_device_wheels.sh [OUT_DIR] [PYTHON_VERSION]
#
# OUT_DIR defaults to .device_wheels (git-ignored, carried to the machine); PYTHON_VERSION to 3.12
# (the GPU machine's). Uses the project's .venv to run pip.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/.device_wheels}
PY_VERSION=${2:-3.12}
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "error: $PY is missing; run make setup first" >&2; exit 2; }
PIP=("$PY" -m pip --disable-pip-version-check)
# Pure-Python (py3-none-any) wheels: mmengine and what it needs beyond the machine's packages.
PURE=(mmengine==0.10.7 addict==2.4.0 termcolor==3.1.0 yapf==0.43.0 platformdirs==4.3.8)

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation py --abi none --platform any -d "$OUT.tmp" "${PURE[@]}"
"${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w "$OUT.tmp" "$ROOT"
rm -rf "$ROOT/build"  # setuptools' scratch folder of that wheel
"${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w "$OUT.tmp" natten==0.21.7
for wheel in "$OUT.tmp"/*.whl; do
    case "$(basename "$wheel")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
        *) echo "error: $(basename "$wheel") is not a pure-Python wheel" >&2; exit 2 ;;
    esac
done
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
du -sh "$OUT"
ls "$OUT"
