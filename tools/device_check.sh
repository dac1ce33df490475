#!/usr/bin/env bash
# The GPU proof in one command (docs/usage.md, "GPU check"): on a machine with CUDA, torch, triton,
# timm and pytest (and no network), install nat_mm and its pure-Python needs from a wheel folder
# (tools/prepare_device_wheels.sh made it), run the CUDA tests, benchmark neighborhood attention
# and the NAT-T backbone against window attention / NATTEN / Swin-T, and write report.md and
# figures.json into the output folder.
#
#   bash tools/device_check.sh WHEEL_DIR OUT_DIR [--quick]
#
# --quick: the bf16 benchmarks only, fewer repeats (when the machine's time is short).
# The wheels are installed into NAT_MM_SITE (kept), else into a fresh `mktemp -d` folder that is
# removed on exit: a fixed folder under the shared temp dir, first on PYTHONPATH, would import
# whatever modules another user planted there.
# Each step has its own time limit, and a step that fails does not stop the others: the report
# says what ran.
set -uo pipefail

WHEELS=${1:?usage: device_check.sh WHEEL_DIR OUT_DIR [--quick]}
OUT=${2:?usage: device_check.sh WHEEL_DIR OUT_DIR [--quick]}
QUICK=${3:-}
PY=${PYTHON:-python3}
if [[ -n "${NAT_MM_SITE:-}" ]]; then
    SITE=$NAT_MM_SITE
else
    SITE=$(mktemp -d -t nat_mm_site.XXXXXX) || { echo "error: mktemp -d failed" >&2; exit 2; }
    trap 'rm -rf "$SITE"' EXIT
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
log() { printf '[device_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, never stop the check
    local name=$1 limit=$2; shift 2
    log "$name (at most ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    log "$name: exit $status"
    echo "$name $status" >>"$OUT/steps.txt"
}

OUT=$(cd "$OUT" && pwd)
WHEELS=$(cd "$WHEELS" && pwd)
# Run from the output folder: Python then imports nat_mm from the installed wheel, not the clone.
cd "$OUT" || exit 2
: >"$OUT/steps.txt"
log "installing the wheels of $WHEELS into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { log "error: the wheels do not install"; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - "$OUT/environment.json" <<'PYTHON' || { log "error: nat_mm does not import"; exit 2; }
import json, sys
import torch
import nat_mm
from nat_mm.ops import available_backends
try:
    import natten
    natten_version = f'{natten.__version__} (libnatten: {getattr(natten, "HAS_LIBNATTEN", "?")})'
except ImportError as error:
    natten_version = f'not importable: {error}'
info = {
    'nat_mm': nat_mm.__version__, 'torch': torch.__version__, 'cuda': torch.version.cuda,
    'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none',
    'natten': natten_version, 'na2d backends': ', '.join(available_backends()),
}
json.dump(info, open(sys.argv[1], 'w'), indent=2)
print(info)
PYTHON

step cuda-tests 300 "$PY" -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" \
    --rootdir "$ROOT" -m gpu --junitxml "$OUT/cuda-tests.xml" "$ROOT/tests/test_ops_cuda.py"
DTYPES=(bfloat16 float32)
REPEATS=10
if [[ "$QUICK" == --quick ]]; then DTYPES=(bfloat16); REPEATS=5; fi
for dtype in "${DTYPES[@]}"; do
    step "na_$dtype" 150 "$PY" -m nat_mm.tools.benchmark_na --device cuda --dtype "$dtype" \
        --repeats "$REPEATS" --methods window,flex,natten,torch --json "$OUT/na_$dtype.json"
    step "backbone_$dtype" 150 "$PY" -m nat_mm.tools.benchmark --backbone nat-tiny --device cuda \
        --dtype "$dtype" --shape 800 1216 --batch 2 --warmup 3 --iters 10 \
        --json "$OUT/backbone_$dtype.json"
done
"$PY" -m nat_mm.analysis.device_report "$OUT"
